"""`crop_resize` (--gpu-augment's batched crop and resize) against torch's own antialiased bicubic, per image."""

import pytest
import torch
import torch.nn.functional as F

from fcmae.data import batched_resize
from fcmae.data.batched_resize import crop_resize, resize_weights


def reference(images, boxes, size):
    """What the per-image loop computed: F.interpolate on each float crop."""
    out = []
    for image, (top, left, h, w) in zip(images, boxes.tolist()):
        crop = image[None, :, top:top + h, left:left + w].float()
        out.append(F.interpolate(crop, size=size, mode="bicubic", antialias=True, align_corners=False)[0])
    return torch.stack(out)


def random_batch(seed=0):
    """Photos of different sizes with crops that shrink, stretch, keep the size, touch the edges, or are 1 px."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(96, 128), (50, 40), (64, 64), (200, 150), (33, 97), (64, 80)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    boxes = torch.tensor([[10, 20, 70, 90],  # shrinks
                          [5, 3, 30, 21],  # stretches
                          [0, 0, 64, 64],  # the whole image at the output's height
                          [0, 0, 200, 150],  # the whole image, shrunk a lot
                          [32, 96, 1, 1],  # one pixel, at the last row and column
                          [3, 7, 48, 64]])  # the output size exactly
    return images, boxes


@pytest.mark.parametrize("size", [(48, 64), (64, 64), (7, 5)])
def test_crop_resize_equals_torch_interpolate_per_image(size):
    images, boxes = random_batch()
    expected = reference(images, boxes, size)
    got = crop_resize(images, boxes, size)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() < 2e-3  # of 255 levels: fp32 rounding in the reference


def test_crop_resize_in_several_chunks_gives_the_same_batch(monkeypatch):
    """Large batches go in chunks below CHUNK_BYTES, largest crops first; the output keeps the input order."""
    images, boxes = random_batch(seed=1)
    whole = crop_resize(images, boxes, (32, 32))
    monkeypatch.setattr(batched_resize, "CHUNK_BYTES", 3 * 70 * 90 * 8 * 2)  # about two crops per chunk
    assert len(batched_resize._chunks(boxes[:, 2].tolist(), boxes[:, 3].tolist(), 3)) >= 3
    assert torch.equal(crop_resize(images, boxes, (32, 32)), whole)
    assert (whole - reference(images, boxes, (32, 32))).abs().max() < 2e-3


def test_resize_weights_are_normalized_and_stay_inside_each_signal():
    weights = resize_weights(torch.tensor([10, 3, 40]), 8, 40)
    assert weights.shape == (3, 8, 40)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 8, dtype=torch.float64))
    assert weights[0, :, 10:].abs().max() == 0 and weights[1, :, 3:].abs().max() == 0


def test_rounded_output_matches_the_old_loop_to_the_8_bit_level():
    """--gpu-augment rounds to 8 bits as PIL does: at most a level off, where float rounding straddles .5."""
    images, boxes = random_batch(seed=2)
    got = crop_resize(images, boxes, (64, 64)).clamp(0, 255).round()
    expected = reference(images, boxes, (64, 64)).clamp(0, 255).round()
    assert (got - expected).abs().max() <= 1 and (got != expected).float().mean() < 1e-3
