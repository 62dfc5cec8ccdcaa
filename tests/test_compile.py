"""torch.compile of the whole forward (encoder, decoder, loss): one graph, same numbers as eager, no recompiles.

On CPU the suite compiles with the "aot_eager" backend: Dynamo captures the whole forward (fullgraph, so any
graph break or data-dependent op fails the test) and AOTAutograd builds the joint forward/backward graph, without
inductor's code generation, which takes minutes per model on a 2-core machine. Set FCMAE_INDUCTOR_TESTS=1 to add
inductor (benchmarks/gpu_check.sh does, on CUDA).
"""

import os

import pytest
import torch

import fcmae
from helpers import SMALL, randomize_, rel_err

BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("FCMAE_INDUCTOR_TESTS"), reason="inductor compiles for minutes on CPU; FCMAE_INDUCTOR_TESTS=1"))]
torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here (the decoder's 1x1 convs)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def model_pair(backend: str, compiler: str, device: str):
    """An eager model and a compiled one with the same random weights (64 px, 4 patches, 2 kept)."""
    eager = randomize_(fcmae.create_model("atto", img_size=64, mask_ratio=0.5, backend=backend, **SMALL))
    compiled = fcmae.create_model("atto", img_size=64, mask_ratio=0.5, backend=backend, **SMALL)
    compiled.load_state_dict(eager.state_dict())
    return eager.to(device), compiled.to(device).compile_step(backend=compiler)


def loss_and_grads(model, imgs, mask=None, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, pred, mask = model(imgs, mask)
    loss.backward()
    return loss.detach(), pred.detach(), mask, {n: p.grad for n, p in model.named_parameters()}


def assert_close(a, b):
    loss_a, pred_a, mask_a, grads_a = a
    tol = 1e-5 if pred_a.device.type == "cpu" else 5e-5  # CUDA kernels sum in other orders
    loss_b, pred_b, mask_b, grads_b = b
    assert torch.equal(mask_a, mask_b)
    assert rel_err(loss_a, loss_b) <= tol and rel_err(pred_a, pred_b) <= tol
    for name, grad in grads_b.items():
        assert rel_err(grads_a[name], grad) <= tol, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", BACKENDS)
def test_compiled_sparse_step_equals_eager_and_never_recompiles(compiler, device, recwarn):
    torch._dynamo.reset()
    eager, compiled = model_pair("sparse", compiler, device)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 64, 64, generator=gen).to(device)
    # The masks are drawn in forward, outside the graph: the same global-RNG draws in both modes.
    assert_close(loss_and_grads(compiled, imgs, seed=1), loss_and_grads(eager, imgs, seed=1))
    with torch._dynamo.config.patch(error_on_recompile=True):  # new masks and images: the same graph
        imgs = torch.randn(3, 3, 64, 64, generator=gen).to(device)
        assert_close(loss_and_grads(compiled, imgs, seed=2), loss_and_grads(eager, imgs, seed=2))
        given = fcmae.random_mask(3, (2, 2), 0.5, generator=gen).to(device)  # a given mask, equal counts
        assert_close(loss_and_grads(compiled, imgs, given), loss_and_grads(eager, imgs, given))
    assert not [w for w in recwarn if "eager" in str(w.message)]

    ragged = torch.tensor([[0.0, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0]], device=device)
    with pytest.warns(UserWarning, match="different numbers of patches runs the sparse encoder in eager mode"):
        result = loss_and_grads(compiled, imgs, ragged)
    assert_close(result, loss_and_grads(eager, imgs, ragged))
    assert set(compiled.state_dict()) == set(eager.state_dict())  # no _orig_mod. prefix


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", BACKENDS)
def test_compiled_dense_step_equals_eager(compiler, device):
    torch._dynamo.reset()
    eager, compiled = model_pair("dense", compiler, device)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)).to(device)
    assert_close(loss_and_grads(compiled, imgs, seed=5), loss_and_grads(eager, imgs, seed=5))


def test_pretrain_with_compile_and_bf16_on_cpu(tmp_path, monkeypatch, capsys):
    """pretrain.py --compile --mixed-precision bf16 end to end (aot_eager standing in for inductor, as above)."""
    import functools

    from test_pretrain import FAST, records, run
    from helpers import write_photos

    write_photos(tmp_path / "photos", 8, size=96)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = []
    step = fcmae.FCMAE._step
    monkeypatch.setattr(fcmae.FCMAE, "_step", lambda self, *a: (compiled.append(torch.compiler.is_compiling()),
                                                                  step(self, *a))[1])
    torch._dynamo.reset()
    argv = FAST + ["--data-path", str(tmp_path / "photos"), "--output-dir", str(tmp_path / "run"), "--max-steps", "6",
                   "--compile", "--mixed-precision", "bf16"]
    assert run(argv) == 0
    assert "mixed precision bf16" in capsys.readouterr().out
    assert len(records(tmp_path / "run")) == 6 and all(r["loss"] > 0 for r in records(tmp_path / "run"))
    # the warm-up step that compiles before training (fcmae.training.compilation) and every training step ran the
    # graph; the reconstruction grid runs eager
    assert compiled.count(True) == 1 + 6
    assert fcmae.load_model(tmp_path / "run" / "fcmae_model.safetensors").config.backend == "sparse"


def test_fp16_without_cuda_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    from test_pretrain import FAST, run

    assert run(FAST + ["--data-path", "demo", "--output-dir", str(tmp_path / "run"), "--mixed-precision", "fp16"]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err
