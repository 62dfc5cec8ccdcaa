"""Mixed precision: bf16 autocast against fp32, and the dtypes the sparse ops keep under it."""

import pytest
import torch

import fcmae
from fcmae.sparse import VisiblePatches
from helpers import SMALL, rel_err

# Stated tolerances of bf16 (8 bits of mantissa, a relative step of 2**-8 = 0.4%) against fp32, at the real init:
# the loss (computed in fp32) within 1e-4 relative; the predictions within 2% of their largest value; the whole
# gradient within 1% in relative L2 norm, and every parameter's gradient pointing the same way (cosine >= 0.99).
# Measured: 1e-7, 0.8%, 0.4% and 0.996.
LOSS_TOL, PRED_TOL, GRAD_TOL, GRAD_COS = 1e-4, 2e-2, 1e-2, 0.99


def loss_and_grads(model, imgs, mask, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, pred, _ = model(imgs, mask)
    loss.backward()
    return loss.detach(), pred.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_bf16_autocast_matches_fp32(backend):
    torch.manual_seed(0)
    model = fcmae.create_model("atto", img_size=64, backend=backend, **SMALL)  # the real init
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(4, 3, 64, 96, generator=gen)
    mask = fcmae.random_mask(4, (2, 3), 0.5, generator=gen)
    loss32, pred32, grads32 = loss_and_grads(model, imgs, mask)
    loss16, pred16, grads16 = loss_and_grads(model, imgs, mask, torch.bfloat16)
    assert loss16.dtype == torch.float32 and pred16.dtype == torch.bfloat16
    assert rel_err(loss16, loss32) <= LOSS_TOL and rel_err(pred16.float(), pred32) <= PRED_TOL
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[name].flatten() for name in grads32])
    assert flat16.dtype == torch.float32 and ((flat16 - flat32).norm() / flat32.norm()).item() <= GRAD_TOL
    for name, grad in grads32.items():
        assert torch.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0) >= GRAD_COS, name


def test_sparse_ops_keep_bf16_canvases_and_fp32_norms(monkeypatch):
    monkeypatch.setattr(fcmae.sparse, "_depthwise_impl", "canvas")  # the others build no canvas
    seen = {"canvas": [], "norm": set()}
    conv, sample_norm = VisiblePatches.depthwise_conv, VisiblePatches.sample_norm
    conv2d = torch.nn.functional.conv2d

    def record_conv(self, x, module):
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda canvas, *args: (
            seen["canvas"].append(canvas.dtype), conv2d(canvas, *args))[1])
        try:
            return conv(self, x, module)
        finally:
            monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)

    def record_norm(self, x):
        out = sample_norm(self, x)
        seen["norm"].add(out.dtype)
        return out

    monkeypatch.setattr(VisiblePatches, "depthwise_conv", record_conv)
    monkeypatch.setattr(VisiblePatches, "sample_norm", record_norm)
    model = fcmae.create_model("atto", img_size=64, **SMALL)
    imgs = torch.randn(3, 3, 64, 64)
    ragged = torch.tensor([[0.0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]])  # the padded GRN path too
    for mask in (None, ragged):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, mask)
        loss.backward()
        assert torch.isfinite(loss)
    # Every depthwise-conv canvas is built in bf16 (on CUDA the residual stream it comes from is fp32).
    assert len(seen["canvas"]) == 2 * 5 and set(seen["canvas"]) == {torch.bfloat16}
    assert seen["norm"] == {torch.float32}


def test_an_fp32_residual_stream_is_cast_before_the_canvas_is_built(monkeypatch):
    """On CUDA, autocast's LayerNorm makes the residual stream fp32: the canvas must still be bf16.

    The canvas implementation of the depthwise conv; the others cast x, the weight and the bias to the autocast dtype
    the same way (tests/test_sparse_depthwise.py::test_equals_canvas_under_bf16_autocast)."""
    monkeypatch.setattr(fcmae.sparse, "_depthwise_impl", "canvas")
    layout = VisiblePatches(torch.tensor([[0.0, 1, 0, 1]]), (2, 2), side=4)
    conv = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    x = torch.randn(2, 4, 4, 8)
    built = []
    scatter = VisiblePatches.scatter
    monkeypatch.setattr(VisiblePatches, "scatter", lambda self, v: (built.append(v.dtype), scatter(self, v))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layout.depthwise_conv(x, conv)
    assert built == [torch.bfloat16] and out.dtype == torch.bfloat16
    assert rel_err(out.float(), layout.depthwise_conv(x, conv)) <= 2e-2
