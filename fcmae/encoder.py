"""The ConvNeXt V2 encoder of FCMAE, run on the visible patches only.

Parameters carry timm's names and shapes (`timm.create_model('convnextv2_*', num_classes=0, conv_mlp=False)`
without `head.*`), so a checkpoint of this encoder is a timm checkpoint. Two backends compute the same function:

  "sparse"  the visible patches in the compact (P, k, k, C) layout of `fcmae.sparse`: every op touches visible
            sites only (the depthwise conv's "tiles" and "gather" implementations read their neighbours too;
            its "canvas" one runs over a full zeroed map).
  "dense"   the masked-dense reference: full (N, H, W, C) maps, re-masked wherever an op could let a removed
            site leak into a visible one (before each depthwise conv and each GRN) and at the output.
  "minkowski", "minkowski-official"  MinkowskiEngine sparse tensors, optional (see `fcmae.minkowski`).

With an all-visible mask both equal timm's `forward_features`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from timm.layers import LayerNorm, calculate_drop_path_rates
from timm.models.convnext import ConvNeXtBlock
from torch import Tensor, nn

from .config.model import BACKENDS, STEM_STRIDE, check_backend, check_stages, total_stride
from .masking import apply_keep, check_mask, grid_size
from .sparse import VisiblePatches, kept_count, strided_conv

__all__ = ["SparseConvNeXtV2", "Block", "BACKENDS"]


def _conv_nhwc(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Apply an nn.Conv2d to a channels-last (N, H, W, C) tensor; returns (N, H', W', C')."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Block(ConvNeXtBlock):
    """timm's ConvNeXt V2 block (dwconv 7x7 -> LN -> Linear -> GELU -> GRN -> Linear -> DropPath -> + x),
    with the two masked forwards. `forward` stays timm's dense NCHW forward."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__(dim, use_grn=True, ls_init_value=None, conv_mlp=False, drop_path=drop_path)

    @property
    def drop_prob(self) -> float:
        return getattr(self.drop_path, "drop_prob", 0.0)

    def forward_sparse(self, x: Tensor, layout: VisiblePatches) -> Tensor:
        """(P, k, k, C) -> (P, k, k, C)."""
        mlp = self.mlp
        shortcut = x
        x = layout.depthwise_conv(x, self.conv_dw)
        x = mlp.act(mlp.fc1(self.norm(x)))
        x = layout.grn(x, mlp.grn.weight, mlp.grn.bias, mlp.grn.eps)
        x = mlp.fc2(x)
        return shortcut + layout.drop_path(x, self.drop_prob, self.training)

    def forward_masked(self, x: Tensor, keep: Callable[[Tensor], Tensor]) -> Tensor:
        """(N, H, W, C) with zeros at removed sites -> (N, H, W, C), same zeros. `keep` zeroes removed sites."""
        mlp = self.mlp
        shortcut = x
        x = keep(_conv_nhwc(x, self.conv_dw))
        x = keep(mlp.act(mlp.fc1(self.norm(x))))  # GRN sums over sites: removed ones must be 0
        x = mlp.fc2(mlp.grn(x))
        return keep(shortcut + self.drop_path(x))


class Stage(nn.Module):
    """Optional downsampling (LayerNorm, then a 2x2 stride-2 conv) followed by `depth` blocks."""

    def __init__(self, in_dim: int, dim: int, drop_path_rates: Sequence[float], downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm(in_dim), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, drop_path=rate) for rate in drop_path_rates])


class SparseConvNeXtV2(nn.Module):
    """ConvNeXt V2 encoder that computes only the visible patches of a masked image.

    Args:
        depths: blocks per stage, e.g. (2, 2, 6, 2).
        dims: channels per stage, e.g. (40, 80, 160, 320).
        drop_path_rate: stochastic depth at the last block, rising linearly from 0 at the first (as timm does);
            in [0, 1) (FCMAEConfig checks it).
        backend: "sparse" (default) or "dense" (the masked-dense reference).
        patch_size: side of a mask patch in pixels; must equal the encoder's total stride (32).
        in_chans: input channels (3 for RGB); only the stem's conv depends on it.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (40, 80, 160, 320),
        drop_path_rate: float = 0.0,
        backend: str = "sparse",
        patch_size: int = 32,
        in_chans: int = 3,
    ):
        super().__init__()
        # FCMAEConfig has checked all settings (FCMAE(config) passes them on); this is its own check of the
        # shape, for a caller who builds the encoder without one.
        check_stages(depths, dims, patch_size)
        self.total_stride = total_stride(depths)
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.backend = backend
        self.num_features = dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=STEM_STRIDE, stride=STEM_STRIDE), LayerNorm(dims[0])
        )
        rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.stages = nn.Sequential(
            *[Stage(dims[max(i - 1, 0)], dims[i], rates[i], downsample=i > 0) for i in range(len(depths))]
        )
        self.apply(init_weights)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)  # also guards a backend switched after construction (encoder.backend = "dense")
        self._backend = value

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode the visible patches.

        Args:
            imgs: (N, in_chans, H, W), H and W multiples of 32.
            mask: (N, L) with 0 = keep, 1 = remove, L = (H / 32) * (W / 32); None keeps every patch.
        Returns:
            (N, C_last, H / 32, W / 32) features, exact zeros at removed patches.
        """
        grid = self.check_input(imgs)
        if mask is None:
            mask = imgs.new_zeros(imgs.shape[0], grid[0] * grid[1])
        mask = check_mask(mask, imgs.shape[0], grid, imgs.device)
        return self.encode(imgs, mask, grid, kept_count(mask))

    forward_features = forward

    def encode(self, imgs: Tensor, mask: Tensor, grid: tuple[int, int], count: int | None = None) -> Tensor:
        """`forward` for inputs already checked (by check_input and check_mask): the chosen backend.

        count: the patches every sample keeps, if known (e.g. a mask from `random_mask`); the sparse backend then
        needs no look at the mask's values. None: it reads them (ragged masks are allowed).
        """
        if self.backend == "sparse":
            return self.forward_sparse(imgs, mask, grid, count)
        if self.backend.startswith("minkowski"):
            from .minkowski import forward_minkowski  # imports MinkowskiEngine: only when asked for

            return forward_minkowski(self, imgs, mask, grid, batch_grn=self.backend == "minkowski-official")
        return self.forward_dense(imgs, mask, grid)

    def check_input(self, imgs: Tensor) -> tuple[int, int]:
        """Validate an image batch and return its patch grid (gh, gw)."""
        if not isinstance(imgs, Tensor) or imgs.ndim != 4 or imgs.shape[1] != self.in_chans or imgs.shape[0] == 0:
            shape = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
            raise ValueError(f"expected a non-empty batch of images of shape (N, {self.in_chans}, H, W), got {shape}")
        weights = self.stem[0].weight
        if not imgs.is_floating_point() or (
            imgs.dtype != weights.dtype and not torch.is_autocast_enabled(imgs.device.type)
        ):
            raise ValueError(f"images are {imgs.dtype} but the weights are {weights.dtype}: convert the images "
                             "(e.g. imgs.float()), or run under torch.autocast")
        if imgs.device != weights.device:
            raise ValueError(f"images are on {imgs.device} but the model is on {weights.device}")
        return grid_size(tuple(imgs.shape[-2:]), self.patch_size)

    def forward_sparse(self, imgs: Tensor, mask: Tensor, grid: tuple[int, int], count: int | None = None) -> Tensor:
        layout = VisiblePatches(mask, grid, side=self.patch_size, count=count)
        x = layout.gather(imgs.permute(0, 2, 3, 1))  # (P, 32, 32, C): the visible image patches
        x = self.stem[1](strided_conv(x, self.stem[0]))
        layout = layout.downsampled(STEM_STRIDE)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = strided_conv(stage.downsample[0](x), stage.downsample[1])
                layout = layout.downsampled(2)
            for block in stage.blocks:
                x = block.forward_sparse(x, layout)
        return layout.scatter(x).permute(0, 3, 1, 2)

    def forward_dense(self, imgs: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        def keep(x: Tensor) -> Tensor:
            return apply_keep(x, mask, grid)

        x = keep(self.stem[1](_conv_nhwc(imgs.permute(0, 2, 3, 1), self.stem[0])))
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = keep(_conv_nhwc(stage.downsample[0](x), stage.downsample[1]))
            for block in stage.blocks:
                x = block.forward_masked(x, keep)
        return x.permute(0, 3, 1, 2)


def init_weights(module: nn.Module) -> None:
    """timm's ConvNeXt V2 init: truncated normal (std 0.02) weights, zero biases.

    Not the official FCMAE pretraining init, which re-draws most weights at std 1 (see docs/finetuning.md,
    "Initialization"): that starts the demo at loss 7 instead of 1 and trains slower.
    """
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
