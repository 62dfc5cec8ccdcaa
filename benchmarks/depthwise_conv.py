"""Time the sparse encoder's 7x7 depthwise conv alone, forward and backward, at each stage's shape: the canvas conv
against the implementations that work on the visible sites only ("gather", "tiles"; see fcmae.sparse).

For each model and stage: the (P, k, k, C) visible sites of a batch at the stage (P = batch x kept patches of a
random mask at --mask-ratio), one conv with random weights, forward and backward with a random upstream gradient
(grads for x, weight and bias). The index maps a stage builds once and shares between its blocks are built before
the timed calls and timed on their own ("index ms": a fresh layout's neighbour or tile index). Compiled, the
graph builds the index from the mask in every call, so "ms" includes one index build. The implementations
of one stage run interleaved, --repeats times after a warm-up, and the medians are reported, so machine noise hits
them alike.

"per step" adds up one training step's depthwise convs: sum over stages of depth x conv + index. "auto" is what
`fcmae.sparse.depthwise_impl` picks per stage on this device and mode.

--whole-step times whole eager pretraining steps instead (benchmarks/step_time.py's step: forward and backward
through encoder, decoder and loss, same weights, images and mask): the masked-dense encoder and the sparse one with
each implementation set by `set_depthwise_impl`, interleaved, medians, and each over the dense step.

    python benchmarks/depthwise_conv.py                                   # tiny b8 and atto b8, 224 px, CPU eager
    python benchmarks/depthwise_conv.py --model tiny --modes eager compiled --impls canvas gather
    python benchmarks/depthwise_conv.py --device cuda --model base --batch-size 128 --precision bf16
    python benchmarks/depthwise_conv.py --whole-step --model tiny --threads 1       # sparse steps over dense
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_variants import Variant, build  # noqa: E402

from fcmae.errors import ConfigError  # noqa: E402
from fcmae.masking import kept_per_sample, random_mask  # noqa: E402
from fcmae.config.model import MODEL_SIZES, resolve_name  # noqa: E402
from fcmae.sparse import VisiblePatches, depthwise_impl, set_depthwise_impl  # noqa: E402

IMPLS = ("canvas", "gather", "tiles")
PATCH, STEM = 32, 4


class Stage:
    """One stage's inputs and its timed calls, per implementation."""

    def __init__(self, batch_size: int, grid: tuple[int, int], side: int, channels: int, mask_ratio: float,
                 device: torch.device, dtype: torch.dtype | None, compiled: bool, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.count = kept_per_sample(grid[0] * grid[1], mask_ratio)
        self.mask = random_mask(batch_size, grid, mask_ratio, generator=gen).to(device)
        self.grid, self.side, self.channels, self.dtype, self.device = grid, side, channels, dtype, device
        self.layout = VisiblePatches(self.mask, grid, side, count=self.count)
        self.conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.conv.to(device, memory_format=torch.channels_last)  # as pretrain.py does
        shape = (self.layout.num_visible, side, side, channels)
        self.x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
        self.upstream = torch.randn(shape, generator=gen).to(device)
        self.compiled = compiled
        self.forwards: dict[str, Callable] = {}

    @property
    def num_sites(self) -> int:
        return self.layout.num_visible * self.side**2

    def forward_for(self, impl: str) -> Callable:
        """The forward the timed step runs: eager on the prepared layout, or compiled from the mask (index included:
        under torch.compile the index is built inside the graph, once per stage, as in the model)."""
        if impl not in self.forwards:
            if self.compiled:
                def forward(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                    layout = VisiblePatches(mask, self.grid, self.side, count=self.count)
                    return layout.depthwise_conv(x, self.conv, impl)

                self.forwards[impl] = torch.compile(forward, fullgraph=True, dynamic=False)
            else:
                self.forwards[impl] = lambda x, mask: self.layout.depthwise_conv(x, self.conv, impl)
        return self.forwards[impl]

    def step(self, impl: str) -> float:
        """Seconds for one forward and backward."""
        forward = self.forward_for(impl)
        self.x.grad = None
        self.conv.zero_grad(set_to_none=True)
        sync(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = forward(self.x, self.mask)
        out.backward(self.upstream.to(out.dtype))
        sync(self.device)
        return time.perf_counter() - start

    def index_time(self, impl: str) -> float:
        """Seconds to build a fresh layout's index for `impl` (0 for the canvas, which needs none)."""
        sync(self.device)
        start = time.perf_counter()
        layout = VisiblePatches(self.mask, self.grid, self.side, count=self.count)
        if impl == "gather":
            layout.neighbour_index((7, 7))
        elif impl == "tiles":
            layout.tile_index((3, 3))
        sync(self.device)
        return time.perf_counter() - start if impl != "canvas" else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model: str, batch_size: int, args: argparse.Namespace, compiled: bool) -> list[dict]:
    """One row per stage plus the per-step total, with the medians of every implementation."""
    depths, dims = MODEL_SIZES[resolve_name(model)]
    grid = (args.img_size // PATCH, args.img_size // PATCH)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    stages = {i: Stage(batch_size, grid, PATCH // STEM >> i, dims[i], args.mask_ratio, device, dtype, compiled, seed=i)
              for i in range(len(dims)) if args.stages is None or i + 1 in args.stages}
    times: dict[tuple[int, str], list[float]] = {(i, impl): [] for i in stages for impl in args.impls}
    for stage in stages.values():  # warm-up: compiles, and grows the allocator's pools
        for impl in args.impls:
            for _ in range(2):
                stage.step(impl)
    for _ in range(args.repeats):
        for i, stage in stages.items():
            for impl in args.impls:
                times[i, impl].append(stage.step(impl))
    index = {(i, impl): statistics.median(stage.index_time(impl) for _ in range(3))
             for i, stage in stages.items() for impl in args.impls}

    mode = "compiled" if compiled else "eager"
    rows, total = [], {impl: 0.0 for impl in args.impls}
    auto_total, auto_names = 0.0, []
    for i, stage in stages.items():
        median = {impl: statistics.median(times[i, impl]) for impl in args.impls}
        for impl in args.impls:
            total[impl] += depths[i] * median[impl] + (0.0 if compiled else index[i, impl])
        auto = resolve_auto(device, stage.side, compiled)
        auto_names.append(auto)
        if auto in median:
            auto_total += depths[i] * median[auto] + (0.0 if compiled else index[i, auto])
        rows.append(dict(model=model, batch=batch_size, mode=mode, stage=i + 1, side=stage.side,
                         channels=stage.channels, sites=stage.num_sites, depth=depths[i],
                         ms={impl: 1e3 * median[impl] for impl in args.impls},
                         index_ms={impl: 1e3 * index[i, impl] for impl in args.impls}, auto=auto))
    complete = len(stages) == len(dims) and all(name in args.impls for name in auto_names)
    rows.append(dict(model=model, batch=batch_size, mode=mode, stage="per step", side="", channels="", sites="",
                     depth=sum(depths), ms={impl: 1e3 * total[impl] for impl in args.impls}, index_ms={},
                     auto=f"{1e3 * auto_total:.1f} ms" if complete else "-"))
    return rows


def resolve_auto(device: torch.device, side: int, compiled: bool) -> str:
    """What `depthwise_impl` answers for a 7x7 conv at this stage, eagerly or inside a compiled graph."""
    if not compiled:
        return depthwise_impl(device, side, 3)
    answer = {}

    def probe(x: torch.Tensor) -> torch.Tensor:
        answer["impl"] = depthwise_impl(device, side, 3)
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(1))
    return answer["impl"]


def measure_steps(model: str, batch_size: int, args: argparse.Namespace) -> str:
    """Median eager step times, dense and sparse with each implementation, interleaved: one Markdown row."""
    models, imgs = build(model, batch_size, args.img_size, args.mask_ratio, args.device, ["eager"], ["sparse", "dense"])
    dense = Variant(models["eager", "dense"], imgs, args.precision)
    sparse = Variant(models["eager", "sparse"], imgs, args.precision)
    names = ["dense"] + [*args.impls, "auto"]
    times: dict[str, list[float]] = {name: [] for name in names}

    def step(name: str) -> float:
        set_depthwise_impl("auto" if name == "dense" else name)
        start = time.perf_counter()
        (dense if name == "dense" else sparse)()
        return time.perf_counter() - start

    for name in names:  # warm-up
        step(name)
    for _ in range(args.repeats):
        for name in names:
            times[name].append(step(name))
    set_depthwise_impl("auto")
    median = {name: 1e3 * statistics.median(times[name]) for name in names}
    cells = [model, batch_size, args.precision, f"{median['dense']:.0f}"]
    cells += [f"{median[name]:.0f} ({median[name] / median['dense']:.2f}x)" for name in names[1:]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def step_table_head(impls: list[str]) -> str:
    head = ["model", "batch", "precision", "dense ms"] + [f"sparse {name} ms (/ dense)" for name in [*impls, "auto"]]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head)


def table(rows: list[dict], impls: list[str]) -> str:
    head = ["model", "batch", "mode", "stage", "k", "C", "sites", "blocks"] + [f"{i} ms" for i in impls]
    head += [f"{i} index ms" for i in impls if i != "canvas"] + ["fastest", "auto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        fastest = min(row["ms"], key=row["ms"].get)
        cells = [row["model"], row["batch"], row["mode"], row["stage"], row["side"], row["channels"], row["sites"],
                 row["depth"]] + [f"{row['ms'][i]:.1f}" for i in impls]
        cells += [f"{row['index_ms'][i]:.2f}" if i in row["index_ms"] else "" for i in impls if i != "canvas"]
        cells += [f"**{fastest}**", row["auto"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny", "atto"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stages", type=int, nargs="+", help="time only these stages (1-4; default: all)")
    parser.add_argument("--whole-step", action="store_true", help="time whole eager steps, dense and sparse")
    parser.add_argument("--output", help="also write the table to this file (Markdown)")
    args = parser.parse_args(argv)
    if args.img_size % PATCH or args.img_size <= 0:
        parser.error(f"--img-size must be a positive multiple of {PATCH}, got {args.img_size}")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for name in args.model:
        try:
            resolve_name(name)
        except ConfigError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # each stage and implementation compiles the same function anew
    torch.backends.cudnn.benchmark = True
    if args.whole_step:
        lines = [step_table_head(args.impls)]
        for model in args.model:
            lines.append(measure_steps(model, args.batch_size, args))
            print(lines[-1], flush=True)
        text = "\n".join(lines)
        print(f"\n{args.img_size} px, mask ratio {args.mask_ratio}, {args.device}, {args.threads} threads, eager, "
              f"median of {args.repeats}\n{text}")
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    rows = []
    for model in args.model:
        for mode in args.modes:
            new = measure(model, args.batch_size, args, compiled=mode == "compiled")
            rows += new
            print(table(new, args.impls), flush=True)
    text = table(rows, args.impls)
    print(f"\n{args.img_size} px, mask ratio {args.mask_ratio}, {args.precision}, {args.device}, "
          f"{args.threads} threads, median of {args.repeats}\n{text}")
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
