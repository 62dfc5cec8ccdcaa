"""Time one full FCMAE pretraining step (forward, backward, decoder and loss) with both encoder backends.

Both backends run in one process on the same weights, images and mask, interleaved after a warm-up, and the
median of the repeats is reported, so that machine noise hits both alike. Peak memory is the tensor memory a
step allocates on top of the model and its inputs.

    python benchmarks/step_time.py                      # the README table: tiny b8 and atto b16 at 224 on CPU
    python benchmarks/step_time.py --model tiny --batch-size 8 --profile   # where the sparse step's time goes
    python benchmarks/step_time.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fcmae

BACKENDS = ("sparse", "dense")


def make_step(model: fcmae.FCMAE, imgs: torch.Tensor, mask: torch.Tensor):
    def step(backend: str) -> torch.Tensor:
        model.encoder.backend = backend
        model.zero_grad(set_to_none=True)
        loss, pred, _ = model(imgs, mask)
        loss.backward()
        if imgs.is_cuda:
            torch.cuda.synchronize()
        return pred.detach()

    return step


def setup(name: str, batch_size: int, img_size: int, mask_ratio: float, device: str):
    torch.manual_seed(0)
    model = fcmae.create_model(name, img_size=img_size, mask_ratio=mask_ratio).to(device)
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    mask = model.random_masking(batch_size, device=device)
    return model, imgs, mask


def measure(args) -> dict[str, float]:
    """Median step time of each backend, their peak memory, and how far their predictions differ."""
    model, imgs, mask = setup(args.model, args.batch_size, args.img_size, args.mask_ratio, args.device)
    step = make_step(model, imgs, mask)
    outputs = {b: step(b) for b in BACKENDS}  # warm-up, and the outputs must agree
    diff = ((outputs["sparse"] - outputs["dense"]).abs().max() / outputs["dense"].abs().max()).item()
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for _ in range(args.repeats):
        for backend in BACKENDS:
            start = time.perf_counter()
            step(backend)
            times[backend].append(time.perf_counter() - start)
    result = {b: statistics.median(t) for b, t in times.items()}
    result["max_rel_diff"] = diff
    for backend in BACKENDS:
        result[f"{backend}_peak"] = float("nan") if args.no_memory else peak_memory(model, step, backend, args.device)
    return result


def peak_memory(model, step, backend: str, device: str) -> float:
    """Peak tensor memory one step allocates beyond the model and its inputs, in GiB.

    CUDA: the caching allocator's peak counter. CPU: the running sum of the allocations and frees that
    torch.profiler records, which counts tensor memory only, as the CUDA counter does.
    """
    step(backend)
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(backend)
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(backend)
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, nbytes in changes:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**30


def profile_sparse(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    model, imgs, mask = setup(args.model, args.batch_size, args.img_size, args.mask_ratio, args.device)
    step = make_step(model, imgs, mask)
    step("sparse")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step("sparse")
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=None, help="model names (default: tiny and atto)")
    parser.add_argument("--batch-size", type=int, nargs="*", default=None, help="one per model (default: 8 16)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the sparse step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or ["convnextv2_tiny", "convnextv2_atto"]
    batch_sizes = args.batch_size or [8, 16][: len(models)]
    if len(batch_sizes) != len(models):
        parser.error("give one --batch-size per --model")

    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}, img {args.img_size}, "
          f"mask ratio {args.mask_ratio}, median of {args.repeats}")
    print("| model | batch | sparse step (s) | dense step (s) | sparse / dense | sparse peak (GiB) | "
          "dense peak (GiB) | max rel. diff of pred |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch_size in zip(models, batch_sizes):
        args.model, args.batch_size = fcmae.models.resolve_name(name), batch_size
        result = measure(args)
        print(f"| {args.model} | {batch_size} | {result['sparse']:.3f} | {result['dense']:.3f} | "
              f"{result['sparse'] / result['dense']:.2f}x | {result['sparse_peak']:.2f} | {result['dense_peak']:.2f} | "
              f"{result['max_rel_diff']:.1e} |", flush=True)
        if args.profile:
            profile_sparse(args)


if __name__ == "__main__":
    main()
