"""The optional MinkowskiEngine backend against the sparse and masked-dense backends, and its batch-wide GRN option.

Tests that need MinkowskiEngine skip, with the reason in pytest's summary, where it is not installed
(scripts/install_minkowskiengine.sh installs it; .ci/run does so from a cached wheel).
"""

import os
import shutil
import subprocess
from pathlib import Path
import sys

import pytest
import torch

import fcmae
from fcmae.encoder import SparseConvNeXtV2

from helpers import FAST, ROOT, SMALL, forward_backward, randomize_, records, rel_err, run_pretrain, write_photos

try:
    import MinkowskiEngine as ME
except ImportError as e:  # pragma: no cover - depends on the environment
    ME, MISSING = None, f"MinkowskiEngine is not installed ({e}); run scripts/install_minkowskiengine.sh"
else:
    MISSING = ""


def needs_me(test):
    """A test of the backend itself: it skips without MinkowskiEngine, naming the reason, and is slow (an optional
    backend, which .ci/run installs and runs with the slow tests)."""
    return pytest.mark.slow(pytest.mark.skipif(ME is None, reason=MISSING)(test))


BACKENDS = ("minkowski", "sparse", "dense")


def encoders(drop_path_rate: float = 0.0, seed: int = 0, backends=BACKENDS) -> dict[str, SparseConvNeXtV2]:
    """One encoder per backend, all with the same random weights."""
    first = randomize_(SparseConvNeXtV2(SMALL["depths"], SMALL["dims"], drop_path_rate, backends[0]), seed)
    out = {backends[0]: first}
    for backend in backends[1:]:
        out[backend] = SparseConvNeXtV2(SMALL["depths"], SMALL["dims"], drop_path_rate, backend)
        out[backend].load_state_dict(first.state_dict())
    return out


def assert_all_same(models: dict[str, SparseConvNeXtV2], imgs, mask, tol=1e-5):
    """Outputs, input gradients and parameter gradients of every backend equal those of the first."""
    (ref_name, ref), *others = models.items()
    out_r, gi_r, gp_r = forward_backward(ref, imgs, mask)
    for name, model in others:
        out, gi, gp = forward_backward(model, imgs, mask)
        assert rel_err(out_r, out) <= tol, (ref_name, name, "output")
        assert rel_err(gi_r, gi) <= tol, (ref_name, name, "input grad")
        assert gp.keys() == gp_r.keys()
        for key in gp:
            assert rel_err(gp_r[key], gp[key]) <= tol, (ref_name, name, key)
    removed = mask.bool().view(mask.shape[0], *out_r.shape[-2:]).to(out_r.device)
    assert (out_r.permute(0, 2, 3, 1)[removed] == 0).all()
    return out_r


# Without MinkowskiEngine too ----------------------------------------------------------------------------------

def test_importing_fcmae_never_imports_minkowski_engine():
    code = ("import sys, fcmae, fcmae.config, fcmae.convert, fcmae.training, fcmae.visualize; "
            "m = fcmae.create_model('atto', img_size=64, backend='minkowski'); "
            "assert not any('MinkowskiEngine' in name for name in sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_minkowski_engine_is_a_one_line_error_naming_the_script(monkeypatch):
    from fcmae.config import ConfigError, PretrainConfig, parse_config

    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # import fails as if it were not installed
    model = fcmae.create_model("atto", img_size=64, backend="minkowski", **SMALL)  # loading needs no ME
    for attempt in (lambda: model(torch.randn(1, 3, 64, 64)), lambda: parse_config(PretrainConfig, ["--backend",
                                                                                                    "minkowski"])):
        with pytest.raises(ValueError, match="needs MinkowskiEngine 0.5.4, which is not installed: run "
                                             "scripts/install_minkowskiengine.sh") as info:
            attempt()
        assert "\n" not in str(info.value) and isinstance(info.value, ImportError)
    with pytest.raises(ConfigError, match="unknown backend 'minkowsky'; choose one of sparse, dense, minkowski"):
        parse_config(PretrainConfig, ["--backend", "minkowsky"])


def test_pretrain_without_minkowski_engine_fails_before_writing(tmp_path):
    if ME is not None:
        pytest.skip("MinkowskiEngine is installed: this checks the error without it")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "pretrain.py", "--backend", "minkowski", "--output-dir", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: the minkowski backend needs")
    assert "scripts/install_minkowskiengine.sh" in result.stderr and not out.exists()


def install_script(*args: str, cache: Path, path: str | None = None) -> subprocess.CompletedProcess:
    """scripts/install_minkowskiengine.sh run with only PATH and its cache folder set."""
    return subprocess.run([shutil.which("bash"), "scripts/install_minkowskiengine.sh", *args], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": path or os.environ["PATH"], "FCMAE_CACHE_DIR": str(cache)})


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be a positive integer, got '0'"),
    (["--sdist", "no/such/MinkowskiEngine-0.5.4.tar.gz"], "--sdist: no file no/such/MinkowskiEngine-0.5.4.tar.gz"),
    (["--sdist", "README.md"], "--sdist takes MinkowskiEngine-0.5.4.tar.gz, got README.md"),
    (["--python", "no-such-python"], "no interpreter 'no-such-python'"),
    (["--frobnicate"], "unknown option --frobnicate"),
])
def test_install_script_answers_bad_input_with_one_line(args, message, tmp_path):
    result = install_script(*args, cache=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {message}")
    assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())


def test_install_script_checks_the_sdist_hash(tmp_path):
    fake = tmp_path / "MinkowskiEngine-0.5.4.tar.gz"
    fake.write_bytes(b"not the sdist")
    result = install_script("--sdist", str(fake), cache=tmp_path / "cache")
    assert result.returncode == 1 and result.stderr == (
        "error: MinkowskiEngine-0.5.4.tar.gz does not have PyPI's SHA-256 "
        "(b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94)\n")
    assert not (tmp_path / "cache").exists()


def test_install_script_cuda_without_nvcc_says_so(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with the basic tools and no nvcc
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "nproc"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = install_script("--cuda", "--python", sys.executable, cache=tmp_path / "c", path=str(bin_dir))
    expected = ("--cuda needs nvcc (a CUDA toolkit) on PATH" if torch.version.cuda else
                f"torch {torch.__version__} is a CPU build: --cuda needs a CUDA build of torch")
    assert result.returncode == 1 and result.stderr == f"error: {expected}\n"


# With MinkowskiEngine ------------------------------------------------------------------------------------------

@needs_me
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 32)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_minkowski_equals_sparse_and_dense_on_random_masks(size, ratio):
    gen = torch.Generator().manual_seed(sum(size))
    imgs = torch.randn(3, 3, *size, generator=gen)
    mask = fcmae.random_mask(3, (size[0] // 32, size[1] // 32), ratio, generator=gen)
    assert_all_same(encoders(), imgs, mask)


@needs_me
def test_minkowski_equals_the_others_on_a_ragged_batch():
    imgs = torch.randn(4, 3, 96, 128)
    mask = torch.tensor([
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # one visible patch
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # all visible
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # nothing visible
        [0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1],
    ], dtype=torch.float32)
    out = assert_all_same(encoders(seed=1), imgs, mask)
    assert (out[2] == 0).all()


@needs_me
def test_minkowski_equals_the_others_with_drop_path_in_training():
    models = encoders(drop_path_rate=0.5, seed=3)
    for model in models.values():
        model.train()
    imgs = torch.randn(6, 3, 64, 96)
    mask = fcmae.random_mask(6, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    out = assert_all_same(models, imgs, mask)
    models["minkowski"].eval()
    assert not torch.allclose(out, models["minkowski"](imgs, mask)), "drop path had no effect in training"


def test_minkowski_on_cuda_equals_sparse_and_dense(monkeypatch):
    """ME's CUDA kernels (convolution, channel-wise convolution, coordinate maps) against the other backends on
    the GPU, fp32, on a ragged batch and a non-square input. Skips without a GPU or ME's CUDA build, unless
    FCMAE_REQUIRE_MINKOWSKI_CUDA is set (benchmarks/gpu_check.sh --minkowski): then it fails."""
    missing = ("no CUDA GPU" if not torch.cuda.is_available() else MISSING if ME is None else
               "MinkowskiEngine was built without CUDA: run scripts/install_minkowskiengine.sh --cuda"
               if not ME.is_cuda_available() else "")
    if missing:
        (pytest.fail if os.environ.get("FCMAE_REQUIRE_MINKOWSKI_CUDA") else pytest.skip)(missing)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 here
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    models = {name: model.cuda() for name, model in encoders(seed=2).items()}
    imgs = torch.randn(4, 3, 64, 96, device="cuda")
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]],
                        dtype=torch.float32, device="cuda")
    out = assert_all_same(models, imgs, mask)
    assert out.is_cuda and (out[2] == 0).all()


@needs_me
def test_same_parameters_and_checkpoints_across_backends(tmp_path):
    torch.manual_seed(0)
    model = fcmae.create_model("atto", img_size=64, backend="minkowski", **SMALL)
    reference = fcmae.create_model("atto", img_size=64, backend="sparse", **SMALL)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    randomize_(model, seed=5)
    fcmae.save_model(model, tmp_path / "m.safetensors")
    loaded = fcmae.load_model(tmp_path / "m.safetensors", backend="sparse")
    assert loaded.encoder.backend == "sparse"
    imgs, mask = torch.randn(2, 3, 64, 64), torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    loss_me, pred_me, _ = model(imgs, mask)
    loss_sparse, pred_sparse, _ = loaded(imgs, mask)
    assert rel_err(pred_me, pred_sparse) <= 1e-5 and abs(loss_me.item() - loss_sparse.item()) <= 1e-5 * loss_sparse.item()


@needs_me
@pytest.mark.parametrize("in_chans", [1, 4])
def test_minkowski_stem_takes_other_channel_counts(in_chans):
    models = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        models[backend] = randomize_(fcmae.create_model("atto", img_size=64, in_chans=in_chans, backend=backend,
                                                        **SMALL).encoder)
    imgs = torch.randn(3, in_chans, 64, 96)
    mask = fcmae.random_mask(3, (2, 3), 0.5, generator=torch.Generator().manual_seed(1))
    assert_all_same(models, imgs, mask)


@needs_me
def test_minkowski_under_bf16_autocast_runs_the_encoder_in_float32(small_model):
    imgs, mask = torch.randn(2, 3, 64, 64), torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    small_model.encoder.backend = "minkowski"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latent = small_model.encoder(imgs, mask)
        loss, _, _ = small_model(imgs, mask)
    assert latent.dtype == torch.float32 and torch.isfinite(loss)
    small_model.encoder.backend = "sparse"
    assert rel_err(latent, small_model.encoder(imgs, mask)) <= 1e-5


# The official batch-wide GRN option ----------------------------------------------------------------------------

@needs_me
def test_batch_grn_by_hand():
    """Two samples, two channels, GRN weight 1 and bias 0, so out = x * (1 + Nx):

    sample 0 has points (3, 0) and (4, 0), sample 1 has (0, 6).
    per sample:  Gx = (5, 0) -> Nx = (2, 0) for sample 0; Gx = (0, 6) -> Nx = (0, 2) for sample 1;
                 out (9, 0), (12, 0), (0, 18).
    batch-wide:  Gx = (5, 6), mean 5.5 -> Nx = (10/11, 12/11) for every point;
                 out (63/11, 0), (84/11, 0), (0, 138/11).
    """
    from fcmae.minkowski import _grn

    feats = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 6.0]])
    x = ME.SparseTensor(feats, coordinates=torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.int32))
    sample = x.C[:, 0].long()
    weight, bias = torch.ones(2), torch.zeros(2)
    per_sample = {tuple(f.tolist()): o for f, o in zip(x.F, _grn(ME, x, weight, bias, 0.0, (sample, 2)).F)}
    batch_wide = {tuple(f.tolist()): o for f, o in zip(x.F, _grn(ME, x, weight, bias, 0.0, None).F)}
    expected_per_sample = {(3.0, 0.0): [9.0, 0.0], (4.0, 0.0): [12.0, 0.0], (0.0, 6.0): [0.0, 18.0]}
    expected_batch = {(3.0, 0.0): [63 / 11, 0.0], (4.0, 0.0): [84 / 11, 0.0], (0.0, 6.0): [0.0, 138 / 11]}
    for point in expected_batch:
        torch.testing.assert_close(per_sample[point], torch.tensor(expected_per_sample[point]))
        torch.testing.assert_close(batch_wide[point], torch.tensor(expected_batch[point]))


def _batch_wide_grn(grn):
    """timm's GRN on a masked-dense (N, H, W, C) map, normalized over all sites of the whole batch."""

    def forward(x):
        gx = torch.linalg.vector_norm(x, dim=(0, 1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)
        return x + torch.addcmul(grn.bias, grn.weight, x * nx)

    return forward


@needs_me
def test_official_option_is_the_masked_dense_encoder_with_batch_wide_grn():
    models = encoders(seed=6, backends=("minkowski-official", "dense"))
    for block in models["dense"].modules():
        if isinstance(block, fcmae.encoder.Block):
            block.mlp.grn.forward = _batch_wide_grn(block.mlp.grn)
    imgs = torch.randn(3, 3, 64, 96)
    mask = fcmae.random_mask(3, (2, 3), 0.5, generator=torch.Generator().manual_seed(2))
    assert_all_same(models, imgs, mask)
    per_sample = encoders(seed=6, backends=("minkowski",))["minkowski"]
    assert rel_err(per_sample(imgs, mask), models["minkowski-official"](imgs, mask)) > 1e-3  # the option matters
    one = imgs[:1], mask[:1]
    assert rel_err(per_sample(*one), models["minkowski-official"](*one)) <= 1e-6  # alike for a batch of one


@needs_me
def test_pretrain_with_minkowski_follows_the_sparse_run(tmp_path):
    """pretrain.py end to end: the same seed gives the same losses with either backend, and they fall."""
    photos = tmp_path / "photos"
    write_photos(photos, 8, size=96)
    losses = {}
    for backend in ("minkowski", "sparse"):
        out = tmp_path / backend
        argv = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "12", "--lr", "2e-3",
                       "--backend", backend]
        assert run_pretrain(argv) == 0
        losses[backend] = torch.tensor([r["loss"] for r in records(out)])
    assert len(losses["sparse"]) == 12 and losses["sparse"][-3:].mean() < losses["sparse"][:3].mean()
    torch.testing.assert_close(losses["minkowski"], losses["sparse"], rtol=1e-3, atol=0)
