"""Time one FCMAE pretraining step (forward and backward through encoder, decoder and loss): sparse vs masked-dense
encoder (and MinkowskiEngine, when installed), eager vs torch.compile, fp32 vs bf16 autocast; and, as the step a
user would otherwise run, timm's dense ConvNeXt V2 of the same size ("timm": forward_features and backward of the
encoder at the same batch, channels-last, the same mode and precision; a mean-square of the features stands in for
a loss).

Every variant runs in one process on the same weights, images and mask (the model draws it from the same seed
each step, on the device, as in training). After a warm-up (which compiles), the variants of one (mode, precision)
run interleaved, and the median of the repeats is reported, so machine noise hits both backends alike.

Columns:
  ms / img/s     median step time and images per second;
  X / dense      a backend's step time over the masked-dense step's, same mode and precision;
  sparse / timm  the sparse FCMAE step's time over timm's dense encoder step (below 1: the sparse step is faster);
  peak           tensor memory a step allocates beyond the model and its inputs (CUDA: the allocator's peak
                 counter; CPU: torch.profiler's allocation record), GiB;
  TFLOP/s        the FLOPs of the step / its time. FLOPs are counted by torch.utils.flop_counter on the eager
                 forward of that backend, 2 x multiply-adds of every matmul and convolution, times 3 for forward
                 and backward (elementwise ops, norms and the loss not counted; see step_flops for why the
                 backward is not counted directly). The sparse backend's count is its own: matmuls over visible
                 sites only; depthwise convs as its implementation runs them ("tiles", the CPU's default: native
                 convs over haloed visible patches; "canvas": over the whole canvas; "gather": not counted, as
                 its multiply-adds are elementwise ops).
  diff           max |pred - pred of eager fp32 dense| / max |pred of eager fp32 dense|, over the removed patches
                 (the ones the loss reads); timm's has no pred.

    python benchmarks/step_time.py                      # CPU: tiny b8 and atto b16 at 224, every column
    python benchmarks/step_time.py --modes eager --precisions fp32 --model tiny --batch-size 8 --profile
    python benchmarks/step_time.py --device cuda --model atto tiny base --batch-size 128 128 128 --precisions bf16
    python benchmarks/step_time.py --backends sparse,dense,minkowski --modes eager --precisions fp32   # with ME
    python benchmarks/step_time.py --no-timm ...        # without timm's row
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step_variants import DTYPES, Variant, build  # noqa: E402

import fcmae  # noqa: E402
from fcmae.training import configure_cuda  # noqa: E402

def step_flops(variant: Variant) -> int:
    """3 x the forward's FLOPs (forward + backward, the usual convention). The backward is not counted itself:
    torch.utils.flop_counter's convolution_backward formula ignores groups, so it counts a depthwise conv's
    backward as a dense conv's, C times too many (checked on torch 2.11 and 2.14)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        with torch.autocast(variant.imgs.device.type, enabled=False):
            variant.forward_only()  # the same mask as the timed step
    return 3 * counter.get_total_flops()


def peak_memory(variant: Variant) -> float:
    """Peak tensor memory one step allocates beyond the model and its inputs, in GiB."""
    variant()
    variant.model.zero_grad(set_to_none=True)
    if variant.cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        variant()
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, nbytes in changes:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**30


def measure(args, name: str, batch_size: int) -> list[dict]:
    """One row per (mode, precision): every backend's time, peak, FLOP rate and prediction difference."""
    models, imgs = build(name, batch_size, args.img_size, args.mask_ratio, args.device, args.modes, args.backends,
                         args.compile_mode, args.compile_backend)
    if args.warmup_only:  # compile (into the shared cache) and leave
        for mode in args.modes:
            for precision in args.precisions:
                for backend in args.backends:
                    Variant(models[mode, backend], imgs, precision)()
        print(f"warmed up {name} b{batch_size} {'/'.join(args.backends)} {'/'.join(args.modes)} "
              f"{'/'.join(args.precisions)}", flush=True)
        return []
    dense = "dense" in args.backends
    reference = (Variant(models[args.modes[0], "dense"], imgs, "fp32")() if "fp32" in args.precisions and dense
                 else None)
    flops = {}
    for backend in args.backends:
        if backend == "timm":
            eager = timm.create_model(name, num_classes=0)
        else:
            eager = fcmae.create_model(name, img_size=args.img_size, mask_ratio=args.mask_ratio, backend=backend)
            eager.load_state_dict(models[args.modes[0], backend].state_dict())
        flops[backend] = step_flops(Variant(eager.to(args.device), imgs, "fp32"))
        del eager
    rows = []
    for mode in args.modes:
        for precision in args.precisions:
            variants = {b: Variant(models[mode, b], imgs, precision) for b in args.backends}
            start = time.perf_counter()
            preds = {b: v() for b, v in variants.items()}  # warm-up: compiles, cuDNN picks kernels
            warmup = time.perf_counter() - start
            for v in variants.values():
                v()
            times: dict[str, list[float]] = {b: [] for b in args.backends}
            for _ in range(args.repeats):
                for backend, variant in variants.items():
                    start = time.perf_counter()
                    variant()
                    times[backend].append(time.perf_counter() - start)
            row = {"model": name, "batch": batch_size, "mode": mode, "precision": precision, "warmup_s": warmup}
            base = reference if reference is not None else preds.get("dense")
            for backend, variant in variants.items():
                seconds = statistics.median(times[backend])
                row[backend] = seconds
                row[f"{backend}_peak"] = float("nan") if args.no_memory else peak_memory(variant)
                row[f"{backend}_tflops"] = flops[backend] / seconds / 1e12
                pred = preds[backend]
                row[f"{backend}_diff"] = (float("nan") if pred is None or base is None else
                                          ((pred - base).abs().max() / base.abs().max()).item())
            rows.append(row)
            print(format_row(row, args.backends), flush=True)
    return rows


def header(backends: list[str]) -> str:
    """The table's header for these backends; ratios are to the masked-dense step, where it is timed."""
    others = [b for b in backends if b != "dense"] if "dense" in backends else []
    versus_timm = ["sparse / timm"] if {"sparse", "timm"} <= set(backends) else []
    cells = ([f"{b} ms" for b in backends] + [f"{b} / dense" for b in others] + versus_timm
             + [f"{b} img/s" for b in backends]
             + [f"{b} peak GiB" for b in backends] + [f"{b} peak / dense" for b in others]
             + [f"{b} TFLOP/s" for b in backends] + ["diff " + " / ".join(b for b in backends if b != "timm")])
    return "| model | batch | mode | precision | " + " | ".join(cells) + " |\n" + "|---" * (len(cells) + 4) + "|"


def format_row(r: dict, backends: list[str]) -> str:
    others = [b for b in backends if b != "dense"] if "dense" in backends else []
    versus_timm = [f"**{r['sparse'] / r['timm']:.2f}x**"] if {"sparse", "timm"} <= set(backends) else []
    cells = ([f"{r[b] * 1e3:.1f}" for b in backends] + [f"**{r[b] / r['dense']:.2f}x**" for b in others] + versus_timm
             + [f"{r['batch'] / r[b]:.1f}" for b in backends] + [f"{r[f'{b}_peak']:.2f}" for b in backends]
             + [f"{r[f'{b}_peak'] / r['dense_peak']:.2f}x" for b in others]
             + [f"{r[f'{b}_tflops']:.2f}" for b in backends]
             + [" / ".join(f"{r[f'{b}_diff']:.1e}" for b in backends if b != "timm")])
    short = r["model"].replace("convnextv2_", "")
    return f"| {short} | {r['batch']} | {r['mode']} | {r['precision']} | " + " | ".join(cells) + " |"


def profile_sparse(args, name: str, batch_size: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    models, imgs = build(name, batch_size, args.img_size, args.mask_ratio, args.device, args.modes[:1], ["sparse"],
                         args.compile_mode, args.compile_backend)
    variant = Variant(models[args.modes[0], "sparse"], imgs, args.precisions[0])
    variant()
    variant()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if imgs.is_cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        variant()
    wall = time.perf_counter() - start
    sort = "self_device_time_total" if imgs.is_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    if imgs.is_cuda:  # launch-bound or not: the GPU's busy time against the step's wall time, kernels launched
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
        depthwise = sum(e.device_time for e in kernels if "conv" in e.name.lower() or "depthwise" in e.name.lower())
        print(f"profile {name} b{batch_size} {args.modes[0]} {args.compile_mode or ''}: {len(kernels)} kernels, GPU "
              f"busy {busy * 1e3:.1f} ms of {wall * 1e3:.1f} ms wall ({busy / wall:.0%}); kernels named conv "
              f"(cuDNN's depthwise convs) {depthwise / 1e6 / max(busy, 1e-9):.0%} of busy time", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=None, help="model names (default: tiny and atto)")
    parser.add_argument("--batch-size", type=int, nargs="*", default=None, help="one per model (default: 8 16)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the sparse step")
    parser.add_argument("--output", help="also write the table to this file (Markdown)")
    parser.add_argument("--no-timm", action="store_true", help="leave out timm's dense ConvNeXt V2 step")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled rows, e.g. "
                        "reduce-overhead (CUDA graphs)")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager: rehearse without code generation")
    parser.add_argument("--warmup-only", action="store_true", help="compile every variant once (into the inductor "
                        "cache, TORCHINDUCTOR_CACHE_DIR) and time nothing: for warm-ups in parallel processes; with --profile, "
                        "only the profile")
    parser.add_argument("--backends", default="sparse,dense",
                        help="comma-separated: sparse, dense (our masked-dense model, the base of the X / dense "
                             "ratios), minkowski (needs MinkowskiEngine, eager only), timm (added unless --no-timm)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    known = set(fcmae.encoder.BACKENDS) | {"timm"}
    unknown = sorted(set(args.backends) - known)
    if unknown or len(set(args.backends)) != len(args.backends) or not args.backends:
        parser.error(f"--backends takes different ones of {', '.join(sorted(known))}")
    if any(b.startswith("minkowski") for b in args.backends):
        from fcmae.minkowski import require

        try:
            require()
        except ImportError as e:
            parser.error(str(e))
        if "compiled" in args.modes:
            parser.error("MinkowskiEngine's ops do not compile: add --modes eager")
    if not args.no_timm and "timm" not in args.backends:
        args.backends.append("timm")
    if args.compile_backend != "inductor" and args.compile_mode:
        print(f"note: --compile-mode {args.compile_mode} is inductor's; not used with {args.compile_backend}")
        args.compile_mode = None
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        configure_cuda()  # as a training run: cuDNN autotuning, TF32 for fp32 matmuls and convs
    models = args.model or ["convnextv2_tiny", "convnextv2_atto"]
    batch_sizes = args.batch_size or [8, 16][: len(models)]
    if len(batch_sizes) != len(models):
        parser.error("give one --batch-size per --model")

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    title = (f"device {device}, torch {torch.__version__}, img {args.img_size}, mask ratio {args.mask_ratio}, "
             f"median of {args.repeats}")
    print(title + "\n" + header(args.backends), flush=True)
    lines = [title, "", header(args.backends)]
    for name, batch_size in zip(models, batch_sizes):
        name = fcmae.config.model.resolve_name(name)
        if not (args.profile and args.warmup_only):  # both: the profile alone, which warms up itself
            lines += [format_row(row, args.backends) for row in measure(args, name, batch_size)]
        if args.output:
            Path(args.output).write_text("\n".join(lines) + "\n")
        if args.profile:
            profile_sparse(args, name, batch_size)
        torch._dynamo.reset()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
