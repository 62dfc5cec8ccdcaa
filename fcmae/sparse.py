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

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VisiblePatches", "strided_conv"]


class VisiblePatches:
    """Index maps between the compact (P, k, k, C) layout and dense (N, H, W, C) maps, for one stage.

    Args:
        mask: (N, L) mask, 0 = keep, 1 = remove, L = gh * gw.
        grid: the patch grid (gh, gw).
        side: k, feature-map sites per patch side at this stage.
    """

    def __init__(self, mask: Tensor, grid: tuple[int, int], side: int):
        self.batch_size, self.num_patches = mask.shape
        self.grid, self.side = grid, side
        visible = mask == 0
        # (P,) index n * L + l of each visible patch; nonzero() returns them sorted by sample, then raster order.
        self.patch_index = visible.flatten().nonzero().squeeze(1)
        self.sample_index = self.patch_index // self.num_patches
        counts = visible.sum(dim=1)
        self.max_count = int(counts.max())
        self.uniform = bool((counts == self.max_count).all())
        # Slot of each patch in a zero-padded (N, max_count) layout, for per-sample sums on ragged batches.
        first_of_sample = counts.cumsum(0) - counts
        rank = torch.arange(len(self.patch_index), device=mask.device) - first_of_sample[self.sample_index]
        self.padded_index = self.sample_index * self.max_count + rank
        self.site_index = self._site_index()

    @property
    def num_visible(self) -> int:
        """P, the number of visible patches in the batch."""
        return len(self.patch_index)

    @property
    def dense_size(self) -> tuple[int, int]:
        """(H, W) of the dense feature map at this stage."""
        return self.grid[0] * self.side, self.grid[1] * self.side

    def downsampled(self, factor: int = 2) -> "VisiblePatches":
        """The same patches after a stride-`factor` downsampling (k -> k / factor)."""
        layout = copy.copy(self)
        layout.side = self.side // factor
        layout.site_index = layout._site_index()
        return layout

    def _site_index(self) -> Tensor:
        """(P * k * k,) flat index of every visible site in a dense (N, gh * k, gw * k) map."""
        gw, k = self.grid[1], self.side
        height, width = self.dense_size
        local = self.patch_index % self.num_patches
        corner = (self.sample_index * height + local // gw * k) * width + local % gw * k
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
        canvas so that the convolution runs as one native depthwise kernel.
        """
        canvas = self.scatter(x).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        out = F.conv2d(canvas, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.gather(out.permute(0, 2, 3, 1))

    # Ops that need per-sample sums ----------------------------------------------------------------------------

    def per_sample(self, values: Tensor) -> Tensor:
        """(N, C) per-sample values -> (P, 1, 1, C), broadcastable against the compact layout."""
        return values.index_select(0, self.sample_index)[:, None, None, :]

    def sample_norm(self, x: Tensor) -> Tensor:
        """(P, k, k, C) -> (N, C): L2 norm of each channel over the visible sites of each sample."""
        channels = x.shape[-1]
        if not self.uniform:  # ragged batch: pad every sample to max_count patches with zeros
            padded = x.new_zeros(self.batch_size * self.max_count, *x.shape[1:])
            x = padded.index_copy(0, self.padded_index, x)
        return torch.linalg.vector_norm(x.reshape(self.batch_size, -1, channels), dim=1)

    def grn(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
        """Global Response Normalization, per sample over visible sites: (P, k, k, C) -> (P, k, k, C).

        Gx = ||x||_2 over the sample's visible sites, Nx = Gx / (mean_c Gx + eps), and
        out = x + weight * (x * Nx) + bias, computed as x * (1 + weight * Nx) + bias: one pass over x, not three.
        """
        gx = self.sample_norm(x)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
        return torch.addcmul(bias, x, self.per_sample(torch.addcmul(torch.ones_like(nx), weight, nx)))

    def drop_path(self, x: Tensor, drop_prob: float, training: bool) -> Tensor:
        """Stochastic depth that drops whole samples (not single patches), scaled by 1 / keep_prob.

        Draws N Bernoulli numbers, exactly as timm's DropPath does on a dense (N, ...) tensor, so both
        layouts consume the same random numbers.
        """
        if drop_prob == 0.0 or not training:
            return x
        keep_prob = 1.0 - drop_prob
        keep = x.new_empty(self.batch_size, 1).bernoulli_(keep_prob).div_(keep_prob)
        return x * self.per_sample(keep)


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
