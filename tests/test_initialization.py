"""Both init schemes set the statistics they document, on every module the official code touches."""

import math

import pytest
import torch
from torch import nn

import fcmae
from fcmae.initialization import initialize

DEPTHS, DIMS = (1, 1, 2, 1), (16, 24, 32, 48)


def model(init: str, seed: int = 0) -> fcmae.FCMAE:
    torch.manual_seed(seed)
    return fcmae.FCMAE(fcmae.FCMAEConfig("custom", DEPTHS, DIMS, img_size=64, decoder_embed_dim=64, init=init))


def weights(m: fcmae.FCMAE, pattern: str) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach()) for n, p in m.named_parameters() if pattern in n]


def truncated_std(std: float, cut: float) -> float:
    """Std of N(0, std^2) truncated at +-cut (absolute), as timm's trunc_normal_ draws it."""
    a = cut / std
    pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    return std * math.sqrt(1 - 2 * a * pdf / mass)


def check_draw(w: torch.Tensor, std: float, cut: float = 2.0) -> None:
    assert w.abs().max() <= cut
    assert w.std().item() == pytest.approx(truncated_std(std, cut), rel=0.2)
    assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel()) + 1e-3


def test_official_scheme_statistics():
    m = model("official")
    enc, dec = m.encoder, m.decoder
    std1 = [enc.stem[0].weight, dec.proj.weight, dec.pred.weight]
    std1 += [b.conv_dw.weight for s in enc.stages for b in s.blocks]
    std1 += [p for s in enc.stages for b in s.blocks for p in (b.mlp.fc1.weight, b.mlp.fc2.weight)]
    std1 += [b.conv_dw.weight for b in dec.blocks]
    for w in std1:  # std 1, cut at +-2: about 0.88
        check_draw(w, 1.0)
    for s in list(enc.stages)[1:]:
        check_draw(s.downsample[1].weight, 0.02)
    for b in dec.blocks:  # PyTorch's default Linear init: uniform(+-1/sqrt(fan_in)), weight and bias
        for fc in (b.mlp.fc1, b.mlp.fc2):
            bound = 1 / math.sqrt(fc.in_features)
            assert fc.weight.abs().max() <= bound
            assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
            assert fc.bias.abs().max() <= bound and fc.bias.abs().max() > 0
    for name, p in m.named_parameters():
        if name.endswith(".bias") and not (name.startswith("decoder.blocks.") and ".mlp.fc" in name):
            assert (p == 0).all(), name
        if "grn" in name:
            assert (p == 0).all(), name
    for module in m.modules():
        if isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all()
    assert m.decoder.mask_token.std().item() == pytest.approx(0.02, rel=0.3)


def test_timm_scheme_statistics():
    m = model("timm")
    for name, p in m.named_parameters():
        if name == "decoder.mask_token":
            assert p.std().item() == pytest.approx(0.02, rel=0.3)
        elif "grn" in name or name.endswith(".bias"):
            assert (p == 0).all(), name
        elif p.ndim > 1:
            assert p.std().item() == pytest.approx(0.02, rel=0.2), name
        else:  # LayerNorm weights
            assert (p == 1).all(), name


def test_timm_scheme_matches_a_fresh_timm_encoder_draw():
    """The timm scheme draws the encoder exactly as before the option existed: encoder first, then decoder."""
    torch.manual_seed(0)
    encoder = fcmae.SparseConvNeXtV2(DEPTHS, DIMS)
    m = model("timm")
    for (name, a), b in zip(encoder.state_dict().items(), m.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def test_official_init_trains_and_runs_finite():
    m = model("official")
    loss, pred, _ = m(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(loss) and torch.isfinite(pred).all()


def test_init_option_in_create_model_config_and_files(tmp_path):
    m = fcmae.create_model("atto", img_size=64, init="official")
    assert m.config.init == "official"
    fcmae.save_model(m, tmp_path / "m.safetensors")
    assert fcmae.load_model(tmp_path / "m.safetensors").config.init == "official"
    with pytest.raises(ValueError, match="unknown init 'jax'"):
        fcmae.create_model("atto", init="jax")
    with pytest.raises(ValueError, match="unknown init"):
        initialize(m, "jax")
