"""fcmae.convert: official MinkowskiEngine / dense checkpoints, timm weights and our files, both ways.

The official layouts are built here from a randomized model with the layout facts and the inverse kernel math
written out independently of the converter; an independent reference of the official computation (F.conv2d,
MinkowskiEngine-style kernel-offset convolutions, batch-wide GRN) checks the converted models numerically.
"""

import argparse
import fractions
import json
import os
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

import fcmae
from fcmae.cli import convert as convert_cli
from fcmae import convert as conv
from helpers import SMALL, one_line_error, randomize_, randomized_small_model, rel_err
from official_layout import me_depthwise_kernel, me_kernel, official_state, save_official


# An independent reference of the official FCMAE computation ---------------------------------------------------


def me_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """A MinkowskiEngine convolution on a dense (N, C_in, H, W) map, straight from the kernel: output (h, w) sums
    input (stride*h + row(n), stride*w + col(n)) @ kernel[n] over offsets n (centred for stride 1)."""
    k = round(kernel.shape[0] ** 0.5)
    pad = (k - 1) // 2 if stride == 1 else 0
    x = F.pad(x, (pad, pad, pad, pad))
    h_out, w_out = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = bias.reshape(1, -1, 1, 1).expand(x.shape[0], -1, h_out, w_out).clone()
    for n in range(k * k):
        row, col = n % k, n // k
        window = x[:, :, row : row + stride * h_out : stride, col : col + stride * w_out : stride]
        if kernel.ndim == 2:  # depthwise (k*k, C)
            out += window * kernel[n].reshape(1, -1, 1, 1)
        else:
            out += torch.einsum("nchw,cd->ndhw", window, kernel[n])
    return out


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, batch_wide: bool) -> torch.Tensor:
    """GRN on (N, H, W, C); batch_wide is MinkowskiEngine's norm over every point of the batch."""
    gx = x.norm(p=2, dim=(0, 1, 2) if batch_wide else (1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return gamma.reshape(-1) * (x * nx) + beta.reshape(-1) + x


def layer_norm_cf(x, weight, bias):
    """LayerNorm over the channels of (N, C, H, W)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, 1e-6).permute(0, 3, 1, 2)


def official_block(x, sd, pre, me, keep):
    """One ConvNeXt V2 block of the official code, (N, C, H, W) -> (N, C, H, W); `keep` zeroes removed sites."""
    c = x.shape[1]
    ln, lin = (".ln", ".linear") if me else ("", "")
    if me:
        y = me_conv(x, sd[pre + "dwconv.kernel"], sd[pre + "dwconv.bias"], stride=1)
    else:
        y = F.conv2d(x, sd[pre + "dwconv.weight"], sd[pre + "dwconv.bias"], padding=3, groups=c)
    y = keep(y).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (c,), sd[f"{pre}norm{ln}.weight"], sd[f"{pre}norm{ln}.bias"], 1e-6)
    y = F.gelu(F.linear(y, sd[f"{pre}pwconv1{lin}.weight"], sd[f"{pre}pwconv1{lin}.bias"]))
    y = keep(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    y = grn(y, sd[pre + "grn.gamma"], sd[pre + "grn.beta"], batch_wide=me)
    y = F.linear(y, sd[f"{pre}pwconv2{lin}.weight"], sd[f"{pre}pwconv2{lin}.bias"])
    return keep(x + y.permute(0, 3, 1, 2))


def official_fcmae(sd: dict, imgs: torch.Tensor, mask: torch.Tensor, me: bool):
    """The official FCMAE forward (encoder, decoder, norm-pix loss) from official-layout tensors with the
    `encoder.` prefix: MinkowskiEngine semantics (me) or the dense model run on masked maps. Returns loss, pred."""
    n, _, height, width = imgs.shape
    gh, gw = height // 32, width // 32
    removed = mask.view(n, 1, gh, gw)

    def keep(x):
        f = x.shape[-1] // gw
        return x * (1 - removed).repeat_interleave(f, 2).repeat_interleave(f, 3)

    ds = "encoder.downsample_layers"
    x = F.conv2d(imgs, sd[f"{ds}.0.0.weight"], sd[f"{ds}.0.0.bias"], stride=4)
    x = keep(layer_norm_cf(x, sd[f"{ds}.0.1.weight"], sd[f"{ds}.0.1.bias"]))
    num_stages = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"{ds}."))
    for s in range(num_stages):
        if s > 0:
            ln = ".ln" if me else ""
            x = layer_norm_cf(x, sd[f"{ds}.{s}.0{ln}.weight"], sd[f"{ds}.{s}.0{ln}.bias"])
            if me:
                x = keep(me_conv(x, sd[f"{ds}.{s}.1.kernel"], sd[f"{ds}.{s}.1.bias"], stride=2))
            else:
                x = keep(F.conv2d(x, sd[f"{ds}.{s}.1.weight"], sd[f"{ds}.{s}.1.bias"], stride=2))
        depth = len({k.split(".")[3] for k in sd if k.startswith(f"encoder.stages.{s}.")})
        for b in range(depth):
            x = official_block(x, sd, f"encoder.stages.{s}.{b}.", me, keep)

    # The decoder is dense in both official models.
    x = F.conv2d(x, sd["proj.weight"], sd["proj.bias"])
    x = x * (1 - removed) + sd["mask_token"] * removed
    depth = len({k.split(".")[1] for k in sd if k.startswith("decoder.")})
    for b in range(depth):
        x = official_block(x, sd, f"decoder.{b}.", me=False, keep=lambda t: t)
    pred = F.conv2d(x, sd["pred.weight"], sd["pred.bias"]).flatten(2).transpose(1, 2)

    target = imgs.reshape(n, 3, gh, 32, gw, 32).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred


# Fixtures ---------------------------------------------------------------------------------------------------


def custom_model(seed: int = 0) -> fcmae.FCMAE:
    """SMALL as a custom size (the name records no named model)."""
    return randomize_(fcmae.create_model("custom", **SMALL), seed).eval()


IMGS = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(5))
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])  # batch 1: MinkowskiEngine's batch-wide GRN is per-sample


# Kernel math ------------------------------------------------------------------------------------------------


def test_kernel_math_is_exact_and_matches_minkowski_convolution():
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(4, 5, 6, generator=gen)  # a 2x2 conv, 5 -> 6 channels
    depthwise = torch.randn(49, 5, generator=gen)
    assert torch.equal(conv.dense_conv_to_me(conv.me_conv_to_dense(kernel)), kernel)
    assert torch.equal(conv.dense_depthwise_to_me(conv.me_depthwise_to_dense(depthwise)), depthwise)
    dense = conv.me_conv_to_dense(kernel)
    assert dense.shape == (6, 5, 2, 2) and torch.equal(me_kernel(dense), kernel)
    assert torch.equal(conv.dense_conv_to_me(dense), me_kernel(dense))
    assert torch.equal(me_depthwise_kernel(conv.me_depthwise_to_dense(depthwise)), depthwise)

    x = torch.randn(2, 5, 8, 6, generator=gen)
    bias = torch.randn(6, generator=gen)
    assert rel_err(F.conv2d(x, dense, bias, stride=2), me_conv(x, kernel, bias, stride=2)) <= 1e-6
    dw = conv.me_depthwise_to_dense(depthwise)
    assert dw.shape == (5, 1, 7, 7)
    assert rel_err(F.conv2d(x, dw, bias[:5], padding=3, groups=5), me_conv(x, depthwise, bias[:5], 1)) <= 1e-6
    # The kernels are not symmetric, so swapping rows and columns would show.
    swapped = F.conv2d(x, dw.transpose(-1, -2), padding=3, groups=5)
    assert not torch.allclose(swapped, F.conv2d(x, dw, padding=3, groups=5))


def test_reference_is_the_official_computation_of_our_model():
    """Sanity of the test's own reference: the dense official computation on our own model's tensors."""
    model = randomized_small_model()
    loss, pred, _ = model(IMGS, MASK)
    ref_loss, ref_pred = official_fcmae(official_state(model.state_dict(), me=False), IMGS, MASK, me=False)
    assert rel_err(pred, ref_pred) <= 1e-5 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


# Official checkpoints -----------------------------------------------------------------------------------------

OFFICIAL_CASES = [  # (me, prefix, decoder, wrapped)
    (True, True, True, True),  # what main_pretrain.py saves
    (False, True, True, True),
    (False, False, False, True),  # like the released convnextv2_*_fcmae.pt
    (False, True, False, False),
    (False, False, True, False),
]


@pytest.mark.parametrize("me, prefix, decoder, wrapped", OFFICIAL_CASES)
def test_official_checkpoints_convert_both_ways(tmp_path, me, prefix, decoder, wrapped):
    model = randomized_small_model(seed=1)
    args = argparse.Namespace(model="convnextv2_atto", input_size=96, mask_ratio=0.5, norm_pix_loss=True, lr=None)
    official = official_state(model.state_dict(), me, prefix, decoder)
    path = save_official(tmp_path / "checkpoint-3.pth", official, wrapped, args if wrapped else None)
    layout = "official-me" if me else "official-dense"
    assert conv.detect_layout(conv.load_checkpoint(path)[0]) == layout

    # --to timm: timm's forward_features equals our encoder with every patch visible.
    weights = conv.to_timm(path)
    reference = timm.create_model("convnextv2_atto", depths=SMALL["depths"], dims=SMALL["dims"], conv_mlp=False,
                                  num_classes=3)  # a custom size converts to Linear MLPs
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert not unexpected and missing and all(k.startswith("head.") for k in missing)
    with torch.no_grad():
        assert rel_err(reference.eval().forward_features(IMGS), model.encoder(IMGS)) <= 1e-5

    # --to fcmae: the exact tensors back, a working model, and the settings the official args record.
    result = conv.convert(path, "fcmae")
    assert result.layout == layout and result.name == "custom"
    ours = result.state
    for key, value in model.state_dict().items():
        if decoder or key.startswith("encoder."):
            assert torch.equal(ours[key], value), key
    if wrapped:
        assert result.config["mask_ratio"] == 0.5 and result.config["img_size"] == [96, 96]
    if not decoder:
        assert any("initialized a fresh one (depth 1, width 512)" in note for note in result.notes)
        assert ours["decoder.proj.weight"].shape == (512, SMALL["dims"][-1], 1, 1)
        return
    converted = result.model.eval()
    with torch.no_grad():
        loss, pred, _ = converted(IMGS, MASK)
        ref_loss, ref_pred = official_fcmae(official_state(model.state_dict(), me, True, True), IMGS, MASK, me)
    assert converted.encoder.backend == "sparse"
    assert rel_err(pred, ref_pred) <= 1e-5 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_minkowski_batch_wide_grn_is_the_one_difference():
    """With a batch of two the official MinkowskiEngine GRN mixes samples; ours (and the dense model's) does not."""
    model = randomized_small_model(seed=2)
    imgs = torch.cat([IMGS, 3 * torch.randn_like(IMGS)])
    mask = torch.cat([MASK, 1 - MASK])
    official = official_state(model.state_dict(), me=True)
    converted = conv.convert({"model": official}, "fcmae").model.eval()
    with torch.no_grad():
        _, pred, _ = converted(imgs, mask)
        _, me_pred = official_fcmae(official, imgs, mask, me=True)
        _, dense_pred = official_fcmae(official_state(model.state_dict(), me=False), imgs, mask, me=False)
    assert rel_err(pred, dense_pred) <= 1e-5
    assert rel_err(pred, me_pred) > 1e-3


# timm ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fcmae.list_models())
def test_timm_output_fits_timms_default_configuration(name):
    with torch.device("meta"):
        state = fcmae.create_model(name).state_dict()
        expected = timm.create_model(name, num_classes=10).state_dict()
    weights = conv.to_timm(state)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in expected.items()
                                                        if not k.startswith("head.")}
    conv_mlp = name.split("_")[1] in ("atto", "femto", "pico", "nano")
    assert weights["stages.0.blocks.0.mlp.fc1.weight"].ndim == (4 if conv_mlp else 2)
    flipped = conv.to_timm(state, conv_mlp=not conv_mlp)
    assert flipped["stages.0.blocks.0.mlp.fc1.weight"].ndim == (2 if conv_mlp else 4)


def test_cli_timm_file_loads_with_pretrained_cfg_overlay(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = randomize_(fcmae.create_model("atto"), seed=3).eval()
    fcmae.save_model(model, tmp_path / "model.safetensors")
    out = tmp_path / "atto_timm.safetensors"
    assert convert_cli.main([str(tmp_path / "model.safetensors"), str(out), "--to", "timm"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"detected fcmae layout in {tmp_path / 'model.safetensors'}: convnextv2_atto")
    assert "dropped the decoder (15 tensors)" in printed
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("stages.0.blocks.0.mlp.fc1.weight").shape == (160, 40, 1, 1)  # timm's atto: conv_mlp
    assert meta["model"] == "convnextv2_atto" and meta["layout"] == "fcmae" and meta["conv_mlp"] == "true"
    assert meta["source"] == str(tmp_path / "model.safetensors")

    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encoder(imgs)
        built = timm.create_model("convnextv2_atto", num_classes=5, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(out))).eval()
        assert rel_err(built.forward_features(imgs), expected) <= 1e-5
        plain = timm.create_model("convnextv2_atto", num_classes=5).eval()
        missing, unexpected = plain.load_state_dict(safetensors.torch.load_file(str(out)), strict=False)
        assert not unexpected and sorted(missing) == ["head.fc.bias", "head.fc.weight", "head.norm.bias",
                                                      "head.norm.weight"]
        assert rel_err(plain.forward_features(imgs), expected) <= 1e-5
    # --no-conv-mlp for a timm model built with Linear MLPs.
    linear = tmp_path / "linear.safetensors"
    assert convert_cli.main([str(tmp_path / "model.safetensors"), str(linear), "--to", "timm", "--no-conv-mlp"]) == 0
    assert "conv_mlp=False" in capsys.readouterr().out
    built = timm.create_model("convnextv2_atto", num_classes=0, conv_mlp=False, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(linear))).eval()
    with torch.no_grad():
        assert rel_err(built.forward_features(imgs), expected) <= 1e-5


def test_timm_weights_with_a_head_round_trip(tmp_path):
    source = randomize_(timm.create_model("convnextv2_atto", depths=SMALL["depths"], dims=SMALL["dims"],
                                          num_classes=7), seed=4)
    state = source.state_dict()
    assert conv.detect_layout(state) == "timm"
    torch.save(state, tmp_path / "timm.pth")
    again = conv.to_timm(tmp_path / "timm.pth", conv_mlp=True)  # a custom size: Linear unless asked, head kept
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert "head.fc.weight" not in conv.to_timm(state, drop_head=True)

    with pytest.raises(ValueError, match=r"classifier head \(4 key\(s\): head.fc.bias, head.fc.weight, "
                                         r"head.norm.bias, head.norm.weight\).*pass --drop-head"):
        conv.to_fcmae(state)
    assert conv.to_fcmae(state, drop_head=True).keys() == conv.convert(state, "fcmae", strict=False).state.keys()
    result = conv.convert(state, "fcmae", strict=False)
    assert any(n.startswith("dropped the classifier head (4 key(s)") for n in result.notes)
    assert any("initialized a fresh one" in n for n in result.notes)
    back = conv.to_timm(result.state, conv_mlp=True)
    assert all(torch.equal(back[k], state[k]) for k in back) and len(back) == len(state) - 4

    # A timm model built with num_classes=0 keeps only head.norm: a complete head.
    headless = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    assert set(conv.to_timm(headless)) == set(headless)
    partial = {k: v for k, v in state.items() if k != "head.norm.bias"}
    with pytest.raises(ValueError, match=r"partial classifier head: missing 1 key\(s\): head.norm.bias"):
        conv.to_timm(partial)
    result = conv.convert(partial, "timm", strict=False)
    assert "head.fc.weight" in result.state and any("lacks 1 key(s): head.norm.bias" in n for n in result.notes)


# Our own formats ----------------------------------------------------------------------------------------------


def test_fcmae_file_round_trips_with_its_config(tmp_path, capsys):
    model = randomize_(fcmae.create_model("atto", img_size=(64, 96), mask_ratio=0.75, **SMALL), seed=5)
    fcmae.save_model(model, tmp_path / "model.safetensors")
    out = tmp_path / "copy.safetensors"
    assert convert_cli.main([str(tmp_path / "model.safetensors"), str(out), "--to", "fcmae"]) == 0
    assert "use: fcmae.load_model" in capsys.readouterr().out
    loaded = fcmae.load_model(out)
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with safetensors.safe_open(str(out), "pt") as f:
        assert f.metadata()["layout"] == "fcmae"


def test_training_state_folder_without_metadata(tmp_path, capsys):
    """Accelerate's save_state writes model.safetensors with {'format': 'pt'} metadata, keys as the model has them
    (here as DistributedDataParallel wraps them), next to optimizer and RNG files."""
    model = custom_model(seed=6)
    folder = tmp_path / "checkpoints" / "step_100"
    folder.mkdir(parents=True)
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.yaml").write_text("model: custom\n")
    (folder / "optimizer.bin").write_bytes(b"not read")
    out = tmp_path / "model.safetensors"
    assert convert_cli.main([str(folder), str(out), "--to", "fcmae"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == (f"detected fcmae layout in {folder}: custom (depths 1,1,2,1, dims "
                                       "16,24,32,40), decoder depth 1 width 32, no classifier head")
    loaded = fcmae.load_model(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    timm_out = tmp_path / "custom_timm.safetensors"
    assert convert_cli.main([str(folder), str(timm_out), "--to", "timm"]) == 0
    assert "depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), conv_mlp=False" in capsys.readouterr().out
    with safetensors.safe_open(str(timm_out), "pt") as f:
        assert json.loads(f.metadata()["timm_kwargs"]) == {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 40],
                                                           "conv_mlp": False}


def test_fresh_decoder_takes_the_requested_shape_and_is_reproducible():
    encoder_only = official_state(custom_model().state_dict(), me=False, prefix=False, decoder=False)
    first = conv.convert(encoder_only, "fcmae", decoder_depth=2, decoder_embed_dim=24)
    assert first.config["decoder_depth"] == 2 and first.config["decoder_embed_dim"] == 24
    assert any("initialized a fresh one (depth 2, width 24)" in n for n in first.notes)
    again = conv.to_fcmae(encoder_only, decoder_depth=2, decoder_embed_dim=24)
    assert all(torch.equal(again[k], v) for k, v in first.state.items())
    with pytest.raises(ValueError, match="decoder of depth 1 and width 32, not the requested .*: set --decoder-depth"):
        conv.to_fcmae(custom_model().state_dict(), decoder_embed_dim=64)


# Errors -------------------------------------------------------------------------------------------------------


def me_checkpoint() -> dict:
    return official_state(custom_model(seed=7).state_dict(), me=True)


def test_missing_unexpected_and_misshaped_keys_are_listed():
    state = me_checkpoint()
    del state["encoder.stages.0.0.norm.ln.bias"]
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): stages.0.blocks.0.norm.bias"):
        conv.to_timm(state)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): encoder.stages.0.blocks.0.norm.bias"):
        conv.to_fcmae(state)

    state = me_checkpoint()
    state["encoder.stages.0.0.extra.weight"] = torch.zeros(3)
    state["decoder.0.dwconv.kernel"] = torch.zeros(49, 32)  # the decoder is dense even in the ME layout
    with pytest.raises(ValueError, match=r"official-me layout\) has keys that do not convert: unexpected 2 key\(s\): "
                                         r"encoder.stages.0.0.extra.weight, decoder.0.dwconv.kernel"):
        conv.to_timm(state)

    state = me_checkpoint()
    state["encoder.stages.1.0.dwconv.kernel"] = torch.zeros(48, 24)
    with pytest.raises(ValueError, match=r"shape mismatch 1 key\(s\): encoder.stages.1.0.dwconv.kernel: \(48, 24\)"):
        conv.to_fcmae(state)

    dense = official_state(custom_model().state_dict(), me=False)
    dense["encoder.stages.2.1.dwconv.weight"] = torch.zeros(32, 1, 5, 5)
    dense["pred.bias"] = torch.zeros(100)
    with pytest.raises(ValueError, match=r"shape mismatch 2 key\(s\): decoder.pred.bias: \(100,\) vs model \(3072,\), "
                                         r"encoder.stages.2.blocks.1.conv_dw.weight: \(32, 1, 5, 5\) vs model "
                                         r"\(32, 1, 7, 7\)"):
        conv.to_fcmae(dense)


def test_partial_decoder_fails_strict_and_is_completed_non_strict():
    state = me_checkpoint()
    del state["decoder.0.grn.gamma"], state["mask_token"]
    with pytest.raises(ValueError, match=r"missing 2 key\(s\): decoder.blocks.0.mlp.grn.weight, decoder.mask_token"):
        conv.to_fcmae(state)
    result = conv.convert(state, "fcmae", strict=False)
    assert any(n.startswith("non-strict: initialized 2 decoder tensor(s) missing from the input: 2 key(s): "
                            "decoder.blocks.0.mlp.grn.weight, decoder.mask_token") for n in result.notes)
    assert torch.equal(result.state["decoder.proj.weight"], custom_model(seed=7).state_dict()["decoder.proj.weight"])


def test_wrong_model_name():
    state = me_checkpoint()
    with pytest.raises(ValueError, match=r"model convnextv2_tiny does not fit <state dict>: its encoder has depths "
                                         r"1,1,2,1 and dims 16,24,32,40, convnextv2_tiny has depths 3,3,9,3"):
        conv.to_timm(state, model="tiny")
    with pytest.raises(ValueError, match="unknown model 'tinyy'"):
        conv.to_timm(state, model="tinyy")
    with torch.device("meta"):
        atto = fcmae.create_model("atto").state_dict()
    with pytest.raises(ValueError, match=r"\(it is a convnextv2_atto\)"):
        conv.to_timm(atto, model="femto")
    assert conv.convert(atto, "timm", model="convnextv2_atto").name == "convnextv2_atto"


def test_unreadable_inputs(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt is not a readable PyTorch or safetensors checkpoint"):
        conv.load_checkpoint(tmp_path / "notes.pt")
    (tmp_path / "README.md").write_text("# A project\n\nNot a checkpoint either.\n")
    with pytest.raises(ValueError, match=r"README.md is not a PyTorch or safetensors checkpoint$"):
        conv.load_checkpoint(tmp_path / "README.md")  # torch's advice to pass weights_only=False is not repeated
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt is not a checkpoint: it holds a list"):
        conv.load_checkpoint(tmp_path / "list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match=r"nothing.pt holds no model weights \(keys: epoch, lr\)"):
        conv.load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"model": me_checkpoint(), "args": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt was refused: loading it needs arbitrary unpickling.*Fraction") as e:
        conv.load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(e.value) and "safe_globals" not in str(e.value)
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="foreign.safetensors: no ConvNeXt V2 encoder weights found"):
        conv.to_timm(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        conv.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="is a folder without weights this project reads; expected an fcmae model"):
        conv.load_checkpoint(tmp_path)

    good = save_official(tmp_path / "good.pth", me_checkpoint(), wrapped=True)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.pth is not a readable PyTorch or safetensors checkpoint"):
        conv.load_checkpoint(tmp_path / "cut.pth")
    fcmae.save_model(custom_model(), tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        conv.load_checkpoint(tmp_path / "cut.safetensors")


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello")
    out = tmp_path / "out.safetensors"
    assert "not a readable PyTorch" in one_line_error(capsys, [tmp_path / "notes.pt", out, "--to", "timm"])
    model_file = tmp_path / "model.safetensors"
    fcmae.save_model(custom_model(), model_file)
    kept = model_file.read_bytes()
    for onto_itself in (model_file, tmp_path):  # the file, or the folder it is read from
        assert "is the input file" in one_line_error(capsys, [onto_itself, model_file, "--to", "timm"])
    assert model_file.read_bytes() == kept
    assert "must be a .safetensors file, got" in one_line_error(capsys, [model_file, tmp_path / "w.pth", "--to",
                                                                         "timm"])
    other = tmp_path / "other.safetensors"
    other.write_bytes(kept)
    assert "other.safetensors exists; pass --overwrite" in one_line_error(capsys, [model_file, other, "--to", "timm"])
    assert other.read_bytes() == kept
    assert convert_cli.main([str(model_file), str(other), "--to", "timm", "--overwrite"]) == 0
    assert other.read_bytes() != kept
    capsys.readouterr()
    assert "argument --to: invalid choice: 'onnx'" in one_line_error(capsys, [model_file, out, "--to", "onnx"])
    ckpt = save_official(tmp_path / "ckpt.pth", me_checkpoint(), wrapped=True, args=argparse.Namespace(model="x"))
    assert "does not fit" in one_line_error(capsys, [ckpt, out, "--to", "timm", "--model", "atto"])
    assert "--conv-mlp applies only to --to timm" in one_line_error(capsys, [ckpt, out, "--to", "fcmae",
                                                                           "--no-conv-mlp"])
    assert "--decoder-depth applies only to --to fcmae" in one_line_error(capsys, [ckpt, out, "--to", "timm",
                                                                                 "--decoder-depth", "2"])
    state = me_checkpoint()
    del state["proj.bias"]
    partial = save_official(tmp_path / "partial.pth", state, wrapped=False)
    assert "missing 1 key(s): decoder.proj.bias" in one_line_error(capsys, [partial, out, "--to", "fcmae"])
    assert not out.exists()

    assert convert_cli.main([str(partial), str(out), "--to", "fcmae", "--no-strict"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"detected official-me layout in {partial}: custom")
    assert "non-strict: initialized 1 decoder tensor(s) missing from the input: 1 key(s): decoder.proj.bias" in printed
    assert fcmae.load_model(out).config.decoder_embed_dim == 32


def test_cli_as_a_process(tmp_path):
    """`python -m fcmae.convert` exits with status 2 and one line, no traceback, for a user mistake."""
    ckpt = save_official(tmp_path / "ckpt.pth", me_checkpoint(), wrapped=True, args=argparse.Namespace(model="x"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    failed = subprocess.run([sys.executable, "-m", "fcmae.convert", str(ckpt), str(tmp_path / "no" / "w.safetensors"),
                             "--to", "timm"], capture_output=True, text=True, env=env)
    assert failed.returncode == 2 and failed.stdout == "" and "Traceback" not in failed.stderr
    assert failed.stderr == f"error: no such folder for w.safetensors: {tmp_path / 'no'}\n"
