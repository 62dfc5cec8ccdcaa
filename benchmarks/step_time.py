"""Time one full FCMAE pretraining step (forward, backward, decoder and loss) with each encoder backend.

The backends run in one process on the same weights, images and mask, interleaved after a warm-up, and the
median of the repeats is reported, so that machine noise hits both alike. Peak memory is the tensor memory a
step allocates on top of the model and its inputs.

    python benchmarks/step_time.py                      # the README table: tiny b8 and atto b16 at 224 on CPU
    python benchmarks/step_time.py --model tiny --batch-size 8 --profile   # where the sparse step's time goes
    python benchmarks/step_time.py --device cuda
    python benchmarks/step_time.py --backends sparse,dense,minkowski   # with MinkowskiEngine installed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fcmae


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
    """Median step time of each backend, their peak memory, and how far their predictions differ (the largest
    relative difference of any backend's from the first's)."""
    model, imgs, mask = setup(args.model, args.batch_size, args.img_size, args.mask_ratio, args.device)
    step = make_step(model, imgs, mask)
    backends = args.backends
    outputs = {b: step(b) for b in backends}  # warm-up, and the outputs must agree
    ref = outputs[backends[0]]
    diff = max([((out - ref).abs().max() / ref.abs().max()).item() for out in outputs.values()])
    times: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.repeats):
        for backend in backends:
            start = time.perf_counter()
            step(backend)
            times[backend].append(time.perf_counter() - start)
    result = {b: statistics.median(t) for b, t in times.items()}
    result["max_rel_diff"] = diff
    for backend in backends:
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
    parser.add_argument("--backends", default="sparse,dense",
                        help="comma-separated encoder backends; times are also given as ratios to dense (default: sparse,dense)")
    args = parser.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(fcmae.encoder.BACKENDS))
    if unknown or len(set(args.backends)) != len(args.backends) or len(args.backends) < 2:
        parser.error(f"--backends takes two or more different ones of {', '.join(fcmae.encoder.BACKENDS)}")
    if any(b.startswith("minkowski") for b in args.backends):
        from fcmae.minkowski import require

        try:
            require()
        except ImportError as e:
            parser.error(str(e))
    torch.set_num_threads(args.threads)
    models = args.model or ["convnextv2_tiny", "convnextv2_atto"]
    batch_sizes = args.batch_size or [8, 16][: len(models)]
    if len(batch_sizes) != len(models):
        parser.error("give one --batch-size per --model")

    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}, img {args.img_size}, "
          f"mask ratio {args.mask_ratio}, median of {args.repeats}")
    backends = args.backends
    base = "dense" if "dense" in backends else backends[-1]
    others = [b for b in backends if b != base]
    columns = ([f"{b} step (s)" for b in backends] + [f"{b} / {base}" for b in others]
               + [f"{b} peak (GiB)" for b in backends] + ["max rel. diff of pred"])
    print("| model | batch | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, batch_size in zip(models, batch_sizes):
        args.model, args.batch_size = fcmae.models.resolve_name(name), batch_size
        result = measure(args)
        cells = ([f"{result[b]:.3f}" for b in backends] + [f"{result[b] / result[base]:.2f}x" for b in others]
                 + [f"{result[f'{b}_peak']:.2f}" for b in backends] + [f"{result['max_rel_diff']:.1e}"])
        print(f"| {args.model} | {batch_size} | " + " | ".join(cells) + " |", flush=True)
        if args.profile:
            profile_sparse(args)


if __name__ == "__main__":
    main()
