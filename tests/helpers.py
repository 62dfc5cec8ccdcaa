"""Helpers shared by the tests: small models keep the suite fast on two CPU cores."""

import torch
from torch import nn


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
    from pathlib import Path

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
