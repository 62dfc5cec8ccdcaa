"""What the step-time benchmarks share (benchmarks/step_time.py, benchmarks/depthwise_conv.py): one model per
(mode, backend) on one set of weights, and one FCMAE pretraining step of it at a precision."""

from __future__ import annotations

import timm
import torch

import fcmae

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class Variant:
    """One model (backend, eager or compiled) and how to run its step at a precision."""

    def __init__(self, model: fcmae.FCMAE, imgs: torch.Tensor, precision: str):
        self.model, self.imgs, self.dtype = model, imgs, DTYPES[precision]
        self.cuda = imgs.is_cuda

    def __call__(self) -> torch.Tensor | None:
        """One step; the prediction at the removed patches (None for timm's encoder)."""
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same mask, drawn on the device, for every variant
        with torch.autocast(self.imgs.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if isinstance(self.model, fcmae.FCMAE):
                loss, pred, mask = self.model(self.imgs)
            else:  # timm's dense encoder: what a user would train instead
                loss, pred = self.model.forward_features(self.imgs).float().square().mean(), None
        loss.backward()
        if self.cuda:
            torch.cuda.synchronize()
        return None if pred is None else pred.detach().float()[mask.bool()]

    def forward_only(self) -> None:
        """The forward, for counting FLOPs."""
        torch.manual_seed(0)
        if isinstance(self.model, fcmae.FCMAE):
            self.model(self.imgs)
        else:
            self.model.forward_features(self.imgs)


def build(name: str, batch_size: int, img_size: int, mask_ratio: float, device: str, modes: list[str],
          backends: list[str], compile_mode: str | None = None, compile_backend: str = "inductor"):
    """{(mode, backend): model} with one set of weights, and the images. Backend "timm" is timm's dense
    ConvNeXt V2 of the same size (compiled whole)."""
    torch.manual_seed(0)
    reference = fcmae.create_model(name, img_size=img_size, mask_ratio=mask_ratio)
    models = {}
    for mode in modes:
        for backend in backends:
            if backend == "timm":
                model = timm.create_model(name, num_classes=0).to(memory_format=torch.channels_last).to(device)
                models[mode, backend] = (torch.compile(model, mode=compile_mode, backend=compile_backend)
                                         if mode == "compiled" else model)
                continue
            model = fcmae.create_model(name, img_size=img_size, mask_ratio=mask_ratio, backend=backend)
            model.load_state_dict(reference.state_dict())
            for module in model.modules():  # as pretrain.py does: conv weights channels-last, like their inputs
                if isinstance(module, torch.nn.Conv2d):
                    module.to(memory_format=torch.channels_last)
            model.to(device)
            models[mode, backend] = (model.compile_step(mode=compile_mode, backend=compile_backend)
                                     if mode == "compiled" else model)
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    return models, imgs
