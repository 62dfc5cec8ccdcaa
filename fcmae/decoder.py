"""The light FCMAE decoder: project, fill removed patches with a mask token, ConvNeXt V2 blocks, predict pixels."""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXtBlock
from torch import Tensor, nn

__all__ = ["FCMAEDecoder"]


class FCMAEDecoder(nn.Module):
    """As in the official release: 1x1 conv to `embed_dim`, a learned mask token at removed positions,
    `depth` dense ConvNeXt V2 blocks of width `embed_dim`, then a 1x1 conv to patch_size**2 * in_chans pixel values.

    Args:
        in_dim: channels of the encoder output.
        embed_dim: decoder width (512 in the paper).
        depth: number of decoder blocks (1 in the paper).
        patch_size: pixels per patch side; each grid cell predicts one patch.
        in_chans: image channels predicted per pixel.
    """

    def __init__(self, in_dim: int, embed_dim: int = 512, depth: int = 1, patch_size: int = 32, in_chans: int = 3):
        super().__init__()
        if embed_dim < 1 or depth < 0:
            raise ValueError(f"decoder_embed_dim must be >= 1 and decoder_depth >= 0, got {embed_dim} and {depth}")
        self.proj = nn.Conv2d(in_dim, embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1))
        self.blocks = nn.Sequential(
            *[ConvNeXtBlock(embed_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(depth)]
        )
        self.pred = nn.Conv2d(embed_dim, patch_size**2 * in_chans, kernel_size=1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """
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
