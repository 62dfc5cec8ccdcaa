"""Helpers shared by the tests: small models keep the suite fast on two CPU cores. Test modules import from here
(and take fixtures from conftest.py), never from each other."""

import json
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from torch import nn

import fcmae
import finetune  # the repository's scripts: pyproject's pytest `pythonpath` puts the repository first on sys.path
import pretrain
from fcmae.cli import convert as convert_cli
from fcmae.cli import run_cli
from fcmae.encoder import SparseConvNeXtV2

ROOT = Path(__file__).resolve().parent.parent  # the repository

# A small, fast pretrain.py run: atto at 64 px, a narrow decoder, no data-loader workers.
FAST = ["--model", "atto", "--input-size", "64", "--batch-size", "4", "--decoder-embed-dim", "64",
        "--num-workers", "0", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--vis-every", "0"]


# A small custom ConvNeXt V2 (the named sizes are far too slow for unit tests on CPU).
SMALL = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), decoder_embed_dim=32)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter: GRN gamma/beta and the LayerNorms would otherwise start as constants
    that hide mistakes (GRN is the identity at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def write_photos(folder, count: int = 12, size: int = 128):
    """Write `count` real photos (scikit-image's samples, cut into crops) as JPEG and PNG files, some nested."""
    from fcmae.data import demo_image_files, load_rgb

    folder = Path(folder)
    files = demo_image_files()
    written = []
    for i in range(count):
        img = load_rgb(files[i % len(files)])
        left = (i // len(files)) * 37 % max(img.width - size, 1)
        crop = img.crop((left, 0, left + min(size, img.width), min(size, img.height)))
        sub = folder / ("nested/deeper" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"photo_{i:03d}.{'jpg' if i % 2 else 'png'}"
        crop.save(path)
        written.append(path)
    return written


def launcher_failure(stderr: str) -> str:
    """What a failed `accelerate launch` printed, minus torchrun's summary (which names no cause)."""
    cause = stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
    return cause[-6000:]


def run_main(main, argv: list[str]) -> int:
    """A script's main in this process, as its command runs it (one-line errors, exit status); the accelerate
    state is reset afterwards so that the next run starts clean."""
    try:
        return run_cli(main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def run_pretrain(argv: list[str]) -> int:
    """pretrain.py's main in this process, as the CLI runs it; returns the exit status."""
    return run_main(pretrain.main, argv)


def run_finetune(argv: list[str]) -> int:
    """finetune.py's main in this process, as the CLI runs it; returns the exit status."""
    return run_main(finetune.main, argv)


def records(output_dir) -> list[dict]:
    """The run's metrics.jsonl, a dict per line."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def error_lines(capsys) -> list[str]:
    """The lines the run printed to stderr that are not the progress bar."""
    return [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("train:")]


def one_line_error(capsys, argv) -> str:
    """fcmae-convert's error for argv: it must exit with status 2, print nothing to stdout and one line to stderr."""
    assert convert_cli.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    return captured.err


def randomized_small_model(seed: int = 0) -> fcmae.FCMAE:
    """SMALL at 64 px with random values in every parameter, in eval mode."""
    return randomize_(fcmae.create_model("atto", img_size=64, **SMALL), seed).eval()


def encoder_pair(drop_path_rate: float = 0.0, seed: int = 0) -> tuple[SparseConvNeXtV2, SparseConvNeXtV2]:
    """A sparse encoder and a dense one (SMALL) with the same random weights."""
    sparse = randomize_(SparseConvNeXtV2(SMALL["depths"], SMALL["dims"], drop_path_rate, "sparse"), seed)
    dense = SparseConvNeXtV2(SMALL["depths"], SMALL["dims"], drop_path_rate, "dense")
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def forward_backward(encoder: nn.Module, imgs: torch.Tensor, mask: torch.Tensor, seed: int = 0):
    """Forward and backward with a fixed random upstream gradient; returns the output (N, C, h, w), the input
    gradient (N, 3, H, W) and the parameter gradients by name."""
    encoder.zero_grad(set_to_none=True)
    imgs = imgs.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same drop-path draws for both backends
    out = encoder(imgs, mask)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * upstream).sum().backward()
    return out, imgs.grad, {n: p.grad for n, p in encoder.named_parameters()}


def benchmark_module(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package; those that import a
    sibling find it because benchmarks/ goes on sys.path first)."""
    import importlib.util
    import sys

    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
