"""The light FCMAE decoder: project, fill removed patches with a mask token, ConvNeXt V2 blocks, predict pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXtBlock
from torch import Tensor, nn

from .grad_strides import in_param_strides

__all__ = ["FCMAEDecoder", "split_patches"]


class FCMAEDecoder(nn.Module):
    """As in the official release: 1x1 conv to `embed_dim`, a learned mask token at removed positions,
    `depth` dense ConvNeXt V2 blocks of width `embed_dim`, then a 1x1 conv to patch_size**2 * in_chans pixel values.

    Two forwards compute the same function. `forward` predicts every patch, as the official code does.
    `forward_removed` predicts only the removed patches, the only ones the loss reads: it projects only the
    visible patches (the mask token overwrites the others), and in the last block runs fc2, the residual and
    `pred` on removed positions only. Everything that needs a neighbourhood or a sum over positions (the depthwise
    convs, every earlier block, the last block's LayerNorm, fc1 and GRN statistics) stays dense.

    Args:
        in_dim: channels of the encoder output.
        embed_dim: decoder width (512 in the paper).
        depth: number of decoder blocks (1 in the paper).
        patch_size: pixels per patch side; each grid cell predicts one patch.
        in_chans: image channels predicted per pixel.
    """

    def __init__(self, in_dim: int, embed_dim: int = 512, depth: int = 1, patch_size: int = 32, in_chans: int = 3):
        super().__init__()  # FCMAEConfig has checked embed_dim >= 1 and depth >= 0
        self.proj = nn.Conv2d(in_dim, embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1))
        # No drop path: forward_removed's last block works on rows, which a DropPath would drop one by one.
        self.blocks = nn.Sequential(
            *[ConvNeXtBlock(embed_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(depth)]
        )
        self.pred = nn.Conv2d(embed_dim, patch_size**2 * in_chans, kernel_size=1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Predict every patch.

        Args:
            x: (N, C_enc, gh, gw) encoder features.
            mask: (N, L) with 0 = keep, 1 = remove, L = gh * gw.
        Returns:
            (N, patch_size**2 * in_chans, gh, gw) predicted pixels per grid cell, in patchify's (p, q, c) order.
        """
        x = self.proj(x)
        removed = mask.view(x.shape[0], 1, *x.shape[2:]).to(x.dtype)
        x = x * (1.0 - removed) + self.mask_token.to(x.dtype) * removed
        return self.pred(self.blocks(x))

    def forward_removed(self, x: Tensor, mask: Tensor, count: int | None = None) -> Tensor:
        """Predict the removed patches only: `forward`'s values there, 0 at kept patches (not computed).

        Args:
            x: (N, C_enc, gh, gw) encoder features.
            mask: (N, L) with 0 = keep, 1 = remove, L = gh * gw.
            count: patches every sample keeps, when the caller knows it (trusted, not checked): no shape then
                depends on the mask's values, so nothing waits on the device and torch.compile(fullgraph=True)
                takes it. None reads the mask (`nonzero`, a host-device sync; eager only), ragged masks allowed.
        Returns:
            (N, L, patch_size**2 * in_chans) predicted pixels per patch in patchify's (p, q, c) order; exact zeros
            at kept patches.
        """
        n, _, gh, gw = x.shape
        kept, removed = split_patches(mask, count)
        # The kept patches' features, projected, on a map that holds the mask token everywhere else.
        tokens = x.permute(0, 2, 3, 1).reshape(n * gh * gw, -1).index_select(0, kept)  # (K, C_enc)
        tokens = F.linear(tokens, in_param_strides(self.proj.weight).flatten(1), self.proj.bias)  # (K, E)
        token = self.mask_token.view(1, -1).to(tokens.dtype)
        canvas = token.expand(n * gh * gw, -1).index_copy(0, kept, tokens)  # (N * L, E)
        x = canvas.view(n, gh, gw, -1).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        for block in self.blocks[:-1]:
            x = block(x)
        if len(self.blocks):
            rows = _last_block_rows(self.blocks[-1], x, removed, None if count is None else gh * gw - count)
        else:
            rows = x.permute(0, 2, 3, 1).reshape(n * gh * gw, -1).index_select(0, removed)  # the mask token
        rows = F.linear(rows, in_param_strides(self.pred.weight).flatten(1), self.pred.bias)  # (M, P)
        pred = rows.new_zeros(n * gh * gw, rows.shape[1]).index_copy(0, removed, rows)
        return pred.view(n, gh * gw, -1)


def _last_block_rows(block: ConvNeXtBlock, x: Tensor, removed: Tensor, removed_count: int | None) -> Tensor:
    """timm's ConvNeXtBlock forward, whose output is read at the `removed` positions only: (N, E, gh, gw) -> (M, E).

    The depthwise conv, LayerNorm, fc1 and GELU run on every position (the conv reads neighbours, and GRN's norm
    is over all gh * gw positions of a sample); GRN's output, fc2 and the residual only on the M removed rows.
    removed: (M,) flat indices n * L + l of the removed patches, sorted by sample; removed_count: patches every
    sample removes when the same for all (M = N * removed_count), None for a ragged mask.
    drop_path must be the identity (as in the decoder): timm's would drop rows here, not samples.
    """
    n, channels, gh, gw = x.shape
    mlp, grn = block.mlp, block.mlp.grn
    shortcut = x.permute(0, 2, 3, 1).reshape(n * gh * gw, channels).index_select(0, removed)  # (M, E)
    h = block.conv_dw(x).permute(0, 2, 3, 1)
    h = mlp.drop1(mlp.act(mlp.fc1(block.norm(h))))  # (N, gh, gw, 4E)
    # timm's GlobalResponseNorm, with its statistics over every position, applied to the removed rows.
    gx = h.norm(p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)  # (N, 1, 1, 4E)
    hidden = h.shape[-1]
    h = h.reshape(n * gh * gw, hidden).index_select(0, removed)  # (M, 4E)
    if removed_count is not None:  # each sample's rows are contiguous: broadcast, no index lookup
        h = h.view(n, removed_count, hidden)
        nx = nx.view(n, 1, hidden)
    else:
        nx = nx.view(n, hidden).index_select(0, torch.div(removed, gh * gw, rounding_mode="floor"))
    h = h + torch.addcmul(grn.bias, grn.weight, h * nx)
    h = mlp.drop2(mlp.fc2(h.view(-1, hidden)))
    if block.gamma is not None:  # layer scale: per channel, so it applies to rows as well
        h = h * block.gamma
    return shortcut + block.drop_path(h)


def split_patches(mask: Tensor, count: int | None = None) -> tuple[Tensor, Tensor]:
    """(N, L) mask -> (kept, removed): flat indices n * L + l of its kept and its removed patches, each sorted by
    sample, then in raster order.

    count: patches every sample keeps, if known: a stable sort of the mask then puts each sample's kept patches
    first, and no shape depends on the mask's values. None: `nonzero()`, which reads the mask on the host.
    """
    n, num_patches = mask.shape
    if count is not None:
        order = mask.argsort(dim=1, stable=True)  # (N, L): kept (0) first, removed (1) after, each in raster order
        flat = order + torch.arange(n, device=mask.device)[:, None] * num_patches
        return flat[:, :count].flatten(), flat[:, count:].flatten()
    flat = mask.flatten()
    return (flat == 0).nonzero().squeeze(1), (flat != 0).nonzero().squeeze(1)
