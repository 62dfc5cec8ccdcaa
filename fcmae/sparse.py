"""A compact layout for the visible patches of masked images, and the ops on it that need neighbours or sums.

Submanifold semantics: a removed patch does not exist. An op computes outputs at visible sites only, a
neighbourhood op sees zeros where removed sites would be, and a per-sample sum runs over visible sites only.

Layout. A batch of feature maps at one stage is held as a tensor of shape (P, k, k, C):
  P  visible patches of the whole batch, sorted by sample, then in raster order within the sample;
  k  feature-map sites per patch side at this stage (patch_size / stride: 8, 4, 2, 1 for ConvNeXt);
  C  channels, last, so that LayerNorm and Linear layers apply to it unchanged.
Per-site ops (LayerNorm, Linear, GELU, residuals) need nothing from this module. Nothing here knows ConvNeXt.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VisiblePatches", "PatchIndex", "strided_conv", "kept_count", "compute_dtype"]


class PatchIndex:
    """The stage-independent maps of a mask's visible patches, shared by the `VisiblePatches` of every stage.

    sample_index, local_index: (P,) sample and raster position of each visible patch, sorted by sample, then in
    raster order. Uniform masks (count given or found): from a stable sort of the mask, which puts each sample's
    kept patches (value 0) first in raster order, so that no shape depends on the mask's values. Ragged masks: from
    `nonzero()`, plus padded_index, each patch's slot in a zero-padded (N, max_count) layout for per-sample sums.
    """

    def __init__(self, mask: Tensor, count: int | None = None):
        self.batch_size, self.num_patches = mask.shape
        if count is None:
            count = kept_count(mask)
        self.count = count
        device = mask.device
        if count is not None:
            local = mask.argsort(dim=1, stable=True)[:, :count]  # (N, count)
            sample = torch.arange(self.batch_size, device=device)
            self.sample_index = sample[:, None].expand(self.batch_size, count).flatten()
            self.local_index = local.flatten()
        else:
            visible = mask == 0
            patch_index = visible.flatten().nonzero().squeeze(1)
            self.sample_index = patch_index // self.num_patches
            self.local_index = patch_index % self.num_patches
            counts = visible.sum(dim=1)
            self.max_count = int(counts.max())
            first_of_sample = counts.cumsum(0) - counts
            rank = torch.arange(len(patch_index), device=device) - first_of_sample[self.sample_index]
            self.padded_index = self.sample_index * self.max_count + rank


class VisiblePatches:
    """Index maps between the compact (P, k, k, C) layout and dense (N, H, W, C) maps, for one stage.

    Two kinds of batch:
      uniform  every sample keeps `count` patches (the masks of `random_mask`). The index maps come from a stable
               sort of the mask, so their shapes are known without reading the mask's values: no host-device sync,
               and `torch.compile(fullgraph=True)` takes the whole model. Per-sample sums and scales are a reshape
               to (N, count * k * k, C) and a broadcast: no index ops, no atomic adds in the backward.
      ragged   samples keep different counts (a user's own mask). Built with `nonzero()`, which reads the mask on
               the host; per-sample ops go through index lookups and a zero-padded layout. Eager mode only.

    Args:
        mask: (N, L) mask, 0 = keep, 1 = remove, L = gh * gw; or the PatchIndex of one (another stage's).
        grid: the patch grid (gh, gw).
        side: k, feature-map sites per patch side at this stage.
        count: patches kept by every sample, when the caller knows it (it is trusted, not checked); None reads
            it from the mask (a device sync), and a mask whose samples keep different counts is ragged.
    """

    def __init__(self, mask: "Tensor | PatchIndex", grid: tuple[int, int], side: int, count: int | None = None):
        index = mask if isinstance(mask, PatchIndex) else PatchIndex(mask, count)
        self.index = index  # shared by every stage
        self.batch_size, self.num_patches, self.count = index.batch_size, index.num_patches, index.count
        self.grid, self.side = grid, side
        self.site_index = self._site_index()

    @property
    def uniform(self) -> bool:
        """Every sample keeps the same number of patches."""
        return self.count is not None

    @property
    def num_visible(self) -> int:
        """P, the number of visible patches in the batch."""
        return self.batch_size * self.count if self.uniform else len(self.index.local_index)

    @property
    def dense_size(self) -> tuple[int, int]:
        """(H, W) of the dense feature map at this stage."""
        return self.grid[0] * self.side, self.grid[1] * self.side

    def downsampled(self, factor: int = 2) -> "VisiblePatches":
        """The same patches after a stride-`factor` downsampling (k -> k / factor)."""
        return VisiblePatches(self.index, self.grid, self.side // factor)

    def _site_index(self) -> Tensor:
        """(P * k * k,) flat index of every visible site in a dense (N, gh * k, gw * k) map."""
        gw, k = self.grid[1], self.side
        height, width = self.dense_size
        local = self.index.local_index
        corner = (self.index.sample_index * height + local // gw * k) * width + local % gw * k
        offsets = torch.arange(k, device=corner.device)
        offsets = offsets[:, None] * width + offsets[None, :]
        return (corner[:, None, None] + offsets).flatten()

    # Moving between layouts ---------------------------------------------------------------------------------

    def gather(self, dense: Tensor) -> Tensor:
        """(N, H, W, C) dense map -> (P, k, k, C) visible sites."""
        channels = dense.shape[-1]
        sites = dense.reshape(-1, channels).index_select(0, self.site_index)
        return sites.view(self.num_visible, self.side, self.side, channels)

    def scatter(self, x: Tensor) -> Tensor:
        """(P, k, k, C) -> (N, H, W, C) dense map with exact zeros at removed sites."""
        channels = x.shape[-1]
        height, width = self.dense_size
        dense = x.new_zeros(self.batch_size * height * width, channels)
        dense.index_copy_(0, self.site_index, x.reshape(-1, channels))
        return dense.view(self.batch_size, height, width, channels)

    # Ops that need neighbours --------------------------------------------------------------------------------

    def depthwise_conv(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        """Submanifold depthwise conv: (P, k, k, C) -> (P, k, k, C).

        Removed sites read as zeros and get no output. The visible sites are placed on a dense channels-last
        canvas so that the convolution runs as one native depthwise kernel. Under autocast the compact tensor is
        cast to the autocast dtype before it is scattered: the canvas is built (and zero-filled) in bf16, not built
        in fp32 and then cast whole.
        """
        x = x.to(compute_dtype(x))
        canvas = self.scatter(x).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        out = F.conv2d(canvas, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.gather(out.permute(0, 2, 3, 1))

    # Ops that need per-sample sums ----------------------------------------------------------------------------

    def _by_sample(self, x: Tensor, values: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """op(x, values of x's sample): (P, k, k, C), (N, C) or (N, 1) -> (P, k, k, C).

        Uniform batches reshape x to (N, count * k * k, C) and broadcast: no index lookup, whose backward would be
        an atomic scatter-add on CUDA (slow, and not bit-reproducible).
        """
        if self.uniform:
            grouped = x.reshape(self.batch_size, self.count * self.side**2, x.shape[-1])
            return op(grouped, values[:, None, :]).view(x.shape)
        return op(x, values.index_select(0, self.index.sample_index)[:, None, None, :])

    def sample_norm(self, x: Tensor) -> Tensor:
        """(P, k, k, C) -> (N, C): L2 norm of each channel over the visible sites of each sample, in fp32 at least."""
        channels = x.shape[-1]
        if not self.uniform:  # ragged batch: pad every sample to max_count patches with zeros
            padded = x.new_zeros(self.batch_size * self.index.max_count, *x.shape[1:])
            x = padded.index_copy(0, self.index.padded_index, x)
        grouped = x.reshape(self.batch_size, -1, channels) if x.numel() else x.new_zeros(self.batch_size, 0, channels)
        return torch.linalg.vector_norm(grouped, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))

    def grn(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
        """Global Response Normalization, per sample over visible sites: (P, k, k, C) -> (P, k, k, C).

        Gx = ||x||_2 over the sample's visible sites, Nx = Gx / (mean_c Gx + eps), and
        out = x + weight * (x * Nx) + bias, computed as x * (1 + weight * Nx) + bias: one pass over x, not three.
        The norms are fp32 under autocast; the result has the dtype timm's GRN gives (x's, promoted by the params').
        """
        gx = self.sample_norm(x)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
        scale = torch.addcmul(torch.ones_like(nx), weight, nx)
        return self._by_sample(x, scale, lambda v, s: torch.addcmul(bias, v, s))

    def drop_path(self, x: Tensor, drop_prob: float, training: bool) -> Tensor:
        """Stochastic depth that drops whole samples (not single patches), scaled by 1 / keep_prob.

        Draws N Bernoulli numbers, exactly as timm's DropPath does on a dense (N, ...) tensor, so both
        layouts consume the same random numbers (in eager mode; compiled graphs draw their own).
        """
        if drop_prob == 0.0 or not training:
            return x
        keep_prob = 1.0 - drop_prob
        keep = x.new_empty(self.batch_size, 1).bernoulli_(keep_prob).div_(keep_prob)
        return self._by_sample(x, keep, torch.mul)


def kept_count(mask: Tensor) -> int | None:
    """The number of patches every sample of an (N, L) mask keeps, or None if samples keep different numbers.

    Reads the mask on the host (a device sync): call it for a user's mask, not for one `random_mask` drew.
    """
    counts = (mask == 0).sum(dim=1)
    lo, hi = torch.stack(torch.aminmax(counts)).tolist() if counts.numel() else (0, 0)
    return int(hi) if lo == hi else None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a conv or matmul on x in: its lower-precision dtype when enabled, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def strided_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A conv whose kernel equals its stride, on channels-last sites: (..., H, W, C_in) -> (..., H/s, W/s, C_out).

    Runs as space-to-depth followed by one matmul. Each output reads only its own s x s block, so it never
    straddles patches when s divides k.
    """
    s = conv.stride[0]
    *lead, height, width, channels = x.shape
    x = x.reshape(*lead, height // s, s, width // s, s, channels)
    x = x.movedim(-4, -3).flatten(-3)  # (..., H/s, W/s, s * s * C) in (p, q, c) order
    weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C_out, C_in, s, s) -> (C_out, s * s * C_in)
    return F.linear(x, weight, conv.bias)
