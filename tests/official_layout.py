"""The official ConvNeXt-V2 checkpoint layouts (MinkowskiEngine and dense), built from our FCMAE state dict with
the layout facts and the inverse kernel math written out independently of the converter (fcmae.convert), so that
the tests check the converter against them."""

import argparse
import re

import torch


def me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense (C_out, C_in, k, k) -> ME (k*k, C_in, C_out): offset n holds the window's row n % k, column n // k."""
    c_out, c_in, k, _ = weight.shape
    kernel = torch.empty(k * k, c_in, c_out)
    for row in range(k):
        for col in range(k):
            kernel[col * k + row] = weight[:, :, row, col].T
    return kernel


def me_depthwise_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense depthwise (C, 1, k, k) -> ME (k*k, C), same offset order."""
    return me_kernel(weight.transpose(0, 1))[:, :, 0]


BLOCK_RENAMES = [("conv_dw.", "dwconv."), ("mlp.fc1.", "pwconv1."), ("mlp.fc2.", "pwconv2."),
                 ("mlp.grn.weight", "grn.gamma"), ("mlp.grn.bias", "grn.beta")]


def official_state(ours: dict, me: bool, prefix: bool = True, decoder: bool = True) -> dict:
    """Our FCMAE state dict in the official layout: MinkowskiEngine (me) or dense, with or without the
    `encoder.` prefix and the decoder."""
    out = {}
    for key, value in ours.items():
        if key.startswith("decoder."):
            if not decoder:
                continue
            key = re.sub(r"^decoder\.(proj|mask_token|pred)", r"\1", key)
            key = re.sub(r"^decoder\.blocks\.", "decoder.", key)
        else:
            key = re.sub(r"^encoder\.stem\.", "encoder.downsample_layers.0.", key)
            key = re.sub(r"^encoder\.stages\.(\d+)\.downsample\.", r"encoder.downsample_layers.\1.", key)
            key = re.sub(r"^encoder\.stages\.(\d+)\.blocks\.", r"encoder.stages.\1.", key)
        for old, new in BLOCK_RENAMES:
            key = key.replace(old, new)
        if key.endswith(("grn.gamma", "grn.beta")):
            value = value.reshape(1, 1, 1, -1)
        if me and key.startswith("encoder.") and not key.startswith("encoder.downsample_layers.0."):
            key, value = me_entry(key, value)
        if not prefix:
            key = key.removeprefix("encoder.")
        out[key] = value.clone()
    return out


def me_entry(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One dense official encoder tensor in the MinkowskiEngine layout."""
    if re.search(r"downsample_layers\.\d+\.0\.|\.norm\.", key):
        return re.sub(r"\.(weight|bias)$", r".ln.\1", key), value
    if ".pwconv" in key:
        return re.sub(r"\.(weight|bias)$", r".linear.\1", key), value
    if key.endswith("grn.gamma") or key.endswith("grn.beta"):
        return key, value.reshape(1, -1)
    if key.endswith(".bias"):
        return key, value.reshape(1, -1)
    if ".dwconv." in key:
        return key.replace(".weight", ".kernel"), me_depthwise_kernel(value)
    return key.replace(".weight", ".kernel"), me_kernel(value)


def save_official(path, state: dict, wrapped: bool, args: argparse.Namespace | None = None):
    """torch.save as the official main_pretrain.py does ({'model': ..., 'optimizer': ..., 'epoch', 'args'})."""
    obj = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "args": args} \
        if wrapped else state
    torch.save(obj, path)
    return path
