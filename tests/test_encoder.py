"""The sparse backend against the masked-dense reference, and both against timm."""

import pytest
import timm
import torch

import fcmae
from fcmae.encoder import SparseConvNeXtV2
from fcmae.errors import ConfigError

from helpers import SMALL, encoder_pair, forward_backward, randomize_, rel_err


def assert_same(sparse, dense, imgs, mask, tol=1e-5):
    out_s, gi_s, gp_s = forward_backward(sparse, imgs, mask)
    out_d, gi_d, gp_d = forward_backward(dense, imgs, mask)
    assert rel_err(out_s, out_d) <= tol
    assert rel_err(gi_s, gi_d) <= tol
    for name in gp_d:
        assert rel_err(gp_s[name], gp_d[name]) <= tol, name
    removed = mask.bool().view(mask.shape[0], *out_s.shape[-2:])
    assert (out_s.permute(0, 2, 3, 1)[removed] == 0).all() and (out_d.permute(0, 2, 3, 1)[removed] == 0).all()
    return out_s


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 32), (128, 64)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_backends_agree_on_random_masks(size, ratio):
    sparse, dense = encoder_pair()
    gen = torch.Generator().manual_seed(sum(size))
    imgs = torch.randn(3, 3, *size, generator=gen)
    mask = fcmae.random_mask(3, (size[0] // 32, size[1] // 32), ratio, generator=gen)
    assert_same(sparse, dense, imgs, mask)


def test_backends_agree_when_samples_have_different_visible_counts():
    sparse, dense = encoder_pair(seed=1)
    imgs = torch.randn(4, 3, 96, 96)
    mask = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 1, 1, 1],  # one visible patch
            [0, 0, 0, 0, 0, 0, 0, 0, 0],  # all visible
            [1, 1, 1, 1, 1, 1, 1, 1, 1],  # nothing visible
            [0, 1, 0, 1, 0, 1, 0, 1, 0],
        ],
        dtype=torch.float32,
    )
    out = assert_same(sparse, dense, imgs, mask)
    assert (out[2] == 0).all()


def test_backends_agree_on_a_batch_of_one():
    sparse, dense = encoder_pair(seed=2)
    imgs = torch.randn(1, 3, 64, 128)
    assert_same(sparse, dense, imgs, torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]]))


def test_backends_agree_with_per_sample_drop_path_in_training():
    sparse, dense = encoder_pair(drop_path_rate=0.5, seed=3)
    sparse.train(), dense.train()
    imgs = torch.randn(6, 3, 64, 64)
    mask = fcmae.random_mask(6, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    out = assert_same(sparse, dense, imgs, mask)
    torch.manual_seed(0)
    sparse.eval()
    assert not torch.allclose(out, sparse(imgs, mask)), "drop path had no effect in training"


def test_gradient_flows_only_from_visible_patches():
    sparse, _ = encoder_pair()
    imgs = torch.randn(2, 3, 64, 64, requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    sparse(imgs, mask).sum().backward()
    patch_grad = imgs.grad.abs().view(2, 3, 2, 32, 2, 32).sum(dim=(1, 3, 5)).flatten(1)
    assert ((patch_grad > 0) == (mask == 0)).all()


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_all_visible_equals_timm_forward_features(backend):
    ours = randomize_(fcmae.create_model("atto", backend=backend).encoder, seed=4)
    ref = timm.create_model("convnextv2_atto", num_classes=0, conv_mlp=False).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    imgs = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(ours.eval()(imgs), ref.forward_features(imgs)) <= 1e-5
        assert rel_err(ours(imgs, torch.zeros(2, 6)), ref.forward_features(imgs)) <= 1e-5


@pytest.mark.parametrize("name", fcmae.list_models())
def test_state_dict_has_timm_keys_and_shapes(name):
    with torch.device("meta"):
        ours = fcmae.create_model(name).encoder.state_dict()
        ref = timm.create_model(name, num_classes=0, conv_mlp=False).state_dict()
    ref = {k: v.shape for k, v in ref.items() if not k.startswith("head.")}
    assert {k: v.shape for k, v in ours.items()} == ref


def test_custom_depths_and_dims_match_timm():
    ours = fcmae.create_model("atto", depths=(1, 2, 1, 1), dims=(8, 16, 24, 32)).encoder
    ref = timm.create_model("convnextv2_atto", depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=0, conv_mlp=False)
    ref.load_state_dict(ours.state_dict(), strict=False)
    imgs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours.eval()(imgs), ref.eval().forward_features(imgs)) <= 1e-5


def test_bad_inputs_raise_clear_errors():
    encoder = SparseConvNeXtV2(SMALL["depths"], SMALL["dims"])
    with pytest.raises(ValueError, match=r"expected a non-empty batch of images of shape \(N, 3, H, W\)"):
        encoder(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected a non-empty batch of images of shape \(N, 3, H, W\)"):
        encoder(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        encoder(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"mask has shape \(1, 4\), expected \(1, 6\)"):
        encoder(torch.randn(1, 3, 64, 96), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"expected a non-empty batch .* got \(0, 3, 64, 64\)"):
        encoder(torch.randn(0, 3, 64, 64))
    with pytest.raises(ValueError, match="images are torch.float16 but the weights are torch.float32"):
        encoder(torch.randn(1, 3, 64, 64).half())
    with pytest.raises(ValueError, match="images are torch.uint8"):
        encoder(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="positive and of equal length"):
        SparseConvNeXtV2(depths=(1, 0, 1, 1))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        SparseConvNeXtV2(backend="cuda")
    with pytest.raises(ValueError, match="patch_size must equal the encoder's total stride 32"):
        SparseConvNeXtV2(patch_size=16)


@pytest.mark.parametrize("settings", [dict(depths=(1, 0, 1, 1)), dict(depths=(1, 1, 1)), dict(patch_size=16),
                                      dict(backend="cuda")])
def test_the_encoder_checks_its_settings_with_the_config_s_own_rules(settings):
    """Issue 26 item 4: one definition of each rule. An encoder built without FCMAEConfig fails with the config's
    ConfigError and message, not with a second, differently worded copy of the check."""
    with pytest.raises(ConfigError) as from_config:
        fcmae.FCMAEConfig("atto", **settings)
    with pytest.raises(ConfigError) as from_encoder:
        SparseConvNeXtV2(**settings)
    assert str(from_encoder.value) == str(from_config.value)
