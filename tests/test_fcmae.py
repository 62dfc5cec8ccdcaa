"""FCMAE model: patches, loss, forward, precision and the public constructors."""

import numpy as np
import pytest
import torch

import fcmae
from helpers import SMALL, randomize_


def test_patchify_uses_p_q_c_order_and_round_trips(small_model):
    imgs = torch.randn(2, 3, 64, 96)
    patches = small_model.patchify(imgs)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    # pixel (c, y, x) -> patch (y // 32) * 3 + x // 32, entry ((y % 32) * 32 + x % 32) * 3 + c
    for c, y, x in [(0, 0, 0), (2, 31, 5), (1, 40, 70), (2, 63, 95)]:
        index = ((y % 32) * 32 + x % 32) * 3 + c
        assert patches[1, (y // 32) * 3 + x // 32, index] == imgs[1, c, y, x]
    assert torch.equal(small_model.unpatchify(patches, grid=(2, 3)), imgs)
    square = torch.randn(1, 3, 64, 64)
    assert torch.equal(small_model.unpatchify(small_model.patchify(square)), square)
    with pytest.raises(ValueError, match="do not form a square grid"):
        small_model.unpatchify(patches)


def loss_by_hand(imgs: np.ndarray, pred: np.ndarray, mask: np.ndarray, norm_pix: bool) -> float:
    """The FCMAE loss written out patch by patch with numpy."""
    n, _, h, w = imgs.shape
    gw = w // 32
    total, count = 0.0, 0
    for i in range(n):
        for l in range(mask.shape[1]):
            if mask[i, l] == 0:
                continue
            r, c = divmod(l, gw)
            target = imgs[i, :, r * 32 : r * 32 + 32, c * 32 : c * 32 + 32].transpose(1, 2, 0).reshape(-1)
            if norm_pix:
                target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
            total += np.mean((pred[i, l] - target) ** 2)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_a_computation_by_hand(norm_pix):
    model = fcmae.create_model("atto", norm_pix_loss=norm_pix, **SMALL)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 96, generator=gen, dtype=torch.float64).float() * 3
    pred = torch.randn(2, 6, 3072, generator=gen)
    mask = torch.tensor([[1.0, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0]])
    loss = model.forward_loss(imgs, pred, mask)
    expected = loss_by_hand(imgs.double().numpy(), pred.double().numpy(), mask.numpy(), norm_pix)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_other_channel_counts_sparse_equals_dense_and_the_loss_by_hand(in_chans):
    """Grayscale and 4-channel (e.g. RGB + near infrared) models: stem, prediction width, patches and loss follow
    in_chans, and the sparse backend computes what the masked-dense reference does (loss, pred, every grad)."""
    models = {}
    for backend in ("sparse", "dense"):
        torch.manual_seed(0)
        models[backend] = randomize_(fcmae.create_model("atto", img_size=64, in_chans=in_chans, backend=backend,
                                                        **SMALL))
    sparse, dense = models["sparse"], models["dense"]
    assert sparse.encoder.stem[0].weight.shape[1] == in_chans and sparse.decoder.pred.out_channels == 1024 * in_chans
    imgs = torch.randn(2, in_chans, 64, 96)
    mask = torch.tensor([[1.0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 1]])
    (loss_s, pred_s, _), (loss_d, pred_d, _) = sparse(imgs, mask), dense(imgs, mask)
    assert pred_s.shape == (2, 6, 1024 * in_chans) and sparse.patchify(imgs).shape == pred_s.shape
    assert torch.equal(sparse.unpatchify(sparse.patchify(imgs), grid=(2, 3)), imgs)
    assert loss_s.item() == pytest.approx(loss_d.item(), rel=1e-5) and torch.allclose(pred_s, pred_d, atol=1e-5)
    loss_s.backward()
    loss_d.backward()
    grads_d = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert torch.allclose(param.grad, grads_d[name].grad, rtol=1e-4, atol=1e-6), name
    expected = loss_by_hand(imgs.double().numpy(), pred_s.detach().double().numpy(), mask.numpy(), norm_pix=True)
    assert loss_s.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=f"expected a non-empty batch of images of shape \\(N, {in_chans}, H, W\\)"):
        sparse(torch.randn(2, 3, 64, 64))


def test_loss_ignores_visible_patches(small_model):
    imgs = torch.randn(1, 3, 64, 64)
    pred = torch.randn(1, 4, 3072)
    mask = torch.tensor([[1.0, 0, 1, 0]])
    other = pred.clone()
    other[:, [1, 3]] = 100.0  # change only the visible patches
    assert small_model.forward_loss(imgs, pred, mask) == small_model.forward_loss(imgs, other, mask)


def test_forward_returns_loss_pred_mask_and_draws_the_mask(small_model):
    imgs = torch.randn(3, 3, 64, 96)
    torch.manual_seed(0)
    loss, pred, mask = small_model(imgs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 6, 3072) and mask.shape == (3, 6)
    assert ((mask == 0).sum(1) == int(6 * 0.4)).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in small_model.parameters() if p.grad is not None)
    given = torch.tensor([[0.0, 1, 1, 0, 1, 1]]).repeat(3, 1)
    assert torch.equal(small_model(imgs, given)[2], given)


def test_decoder_puts_the_mask_token_at_removed_patches_only():
    model = randomize_(fcmae.create_model("atto", decoder_depth=0, **SMALL))  # pred reads its own cell only
    latent = torch.randn(1, 40, 2, 2)
    mask = torch.tensor([[1.0, 0, 1, 0]])
    before = model.forward_decoder(latent, mask)
    with torch.no_grad():
        model.decoder.mask_token.add_(1.0)
    after = model.forward_decoder(latent, mask)
    assert torch.equal(before[:, [1, 3]], after[:, [1, 3]])  # visible: projected features
    assert not torch.allclose(before[:, [0, 2]], after[:, [0, 2]])  # removed: the token
    assert torch.equal(after[:, 0], after[:, 2])  # every removed patch sees the same token


def test_no_nan_at_init_for_every_named_size_config():
    for name in ["atto", "nano"]:
        model = fcmae.create_model(name, img_size=64)
        loss, pred, _ = model(torch.randn(2, 3, 64, 64))
        assert torch.isfinite(loss) and torch.isfinite(pred).all()


def test_channels_last_input_gives_the_same_result(small_model):
    randomize_(small_model)
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    ref = small_model(imgs, mask)
    cl = small_model(imgs.contiguous(memory_format=torch.channels_last), mask)
    assert torch.allclose(ref[0], cl[0], rtol=1e-6) and torch.allclose(ref[1], cl[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_bf16_autocast_on_cpu(small_model, backend):
    small_model.encoder.backend = backend
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0]])
    ref, _, _ = small_model(imgs, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = small_model(imgs, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_create_model_names_and_overrides():
    assert fcmae.list_models() == [f"convnextv2_{s}" for s in "atto femto pico nano tiny base large huge".split()]
    model = fcmae.create_model("convnextv2_femto", img_size=(64, 96), mask_ratio=0.75, decoder_depth=2,
                               decoder_embed_dim=64, norm_pix_loss=False, drop_path_rate=0.1, backend="dense")
    assert model.encoder.dims == (48, 96, 192, 384) and model.grid == (2, 3)
    assert len(model.decoder.blocks) == 2 and model.decoder.proj.out_channels == 64
    assert model.config.mask_ratio == 0.75 and model.encoder.backend == "dense"
    assert model.random_masking(4).shape == (4, 6)
    assert fcmae.create_model("tiny", depths=(1, 1, 1, 1)).encoder.depths == (1, 1, 1, 1)


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; choose one of convnextv2_atto"):
        fcmae.create_model("resnet50")
    with pytest.raises(ValueError, match="unknown key mask_ration in create_model's settings; did you mean mask_ratio"):
        fcmae.create_model("atto", mask_ration=0.5)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        fcmae.create_model("atto", mask_ratio=1.0)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        fcmae.create_model("atto", img_size=100)
    with pytest.raises(ValueError, match="unknown backend"):
        fcmae.create_model("atto", backend="minkowsky")
