"""FCMAE: a sparse ConvNeXt V2 encoder, a light decoder, and a normalized-pixel MSE on the removed patches."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .config.model import FCMAEConfig
from .decoder import FCMAEDecoder
from .encoder import SparseConvNeXtV2
from .initialization import initialize
from .masking import check_mask, grid_size, kept_per_sample, random_mask
from .sparse import kept_count

__all__ = ["FCMAE", "create_model"]


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder (Woo et al., 2023).

    Args:
        config: the model (`FCMAEConfig`: size, img_size, in_chans, mask ratio, decoder, loss, backend, init),
            already validated; `model.config` is this object. `fcmae.create_model(name, **settings)` builds both.

    img_size sets the grid of masks drawn without images; any input whose sides are multiples of 32 is accepted.
    """

    def __init__(self, config: FCMAEConfig | None = None):
        super().__init__()
        config = FCMAEConfig() if config is None else config
        if not isinstance(config, FCMAEConfig):
            raise TypeError(f"FCMAE takes an FCMAEConfig, got {type(config).__name__}; for keyword settings use "
                            "fcmae.create_model(name, **settings)")
        self.config = config
        self.grid = config.grid
        self.encoder = SparseConvNeXtV2(config.depths, config.dims, config.drop_path_rate, config.backend,
                                        config.patch_size, config.in_chans)
        self.decoder = FCMAEDecoder(config.dims[-1], config.decoder_embed_dim, config.decoder_depth,
                                    config.patch_size, config.in_chans)
        initialize(self, config.init)  # like the official code: the whole model, once built
        self._compiled_step = None
        self._cudagraphs = False  # the compiled step replays CUDA graphs (compile_step's mode)
        self._warned_ragged = False

    # Read-only views of the config: set them through it (`FCMAE(config.replace(mask_ratio=0.75))`).
    patch_size = property(lambda self: self.config.patch_size)
    in_chans = property(lambda self: self.config.in_chans)
    mask_ratio = property(lambda self: self.config.mask_ratio)
    norm_pix_loss = property(lambda self: self.config.norm_pix_loss)

    @property
    def replays_cuda_graphs(self) -> bool:
        """The compiled step replays CUDA graphs (compile_step's mode "reduce-overhead" or "max-autotune")."""
        return self._compiled_step is not None and self._cudagraphs

    # Patches ------------------------------------------------------------------------------------------------

    def patchify(self, imgs: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, p * p * C), each patch flattened in (p, q, c) order as in MAE; C = in_chans."""
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (N, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        grid_size(tuple(imgs.shape[-2:]), self.patch_size)
        p = self.patch_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """(N, L, p * p * C) -> (N, C, H, W). `grid` is (gh, gw); by default the square grid of L patches."""
        p, width = self.patch_size, self.patch_size**2 * self.in_chans
        if x.ndim != 3 or x.shape[-1] != width:
            raise ValueError(f"expected patches of shape (N, L, {width}), got {tuple(x.shape)}")
        if grid is None:
            side = round(x.shape[1] ** 0.5)
            if side * side != x.shape[1]:
                raise ValueError(f"{x.shape[1]} patches do not form a square grid; pass grid=(gh, gw)")
            grid = (side, side)
        if grid[0] * grid[1] != x.shape[1]:
            raise ValueError(f"a {grid[0]}x{grid[1]} grid does not hold {x.shape[1]} patches")
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)

    def random_masking(
        self,
        batch_size: int,
        grid: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """(N, L) mask at this model's mask_ratio, 0 is keep, 1 is remove; `grid` defaults to img_size's."""
        return random_mask(batch_size, grid or self.grid, self.mask_ratio, generator=generator, device=device)

    # The data path ------------------------------------------------------------------------------------------

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """(N, in_chans, H, W), (N, L) -> (N, C_last, gh, gw), zeros at removed patches."""
        return self.encoder(imgs, mask)

    def forward_decoder(self, x: Tensor, mask: Tensor, count: int | None = None, every_patch: bool = True) -> Tensor:
        """(N, C_last, gh, gw), (N, L) -> (N, L, p * p * in_chans) predicted pixels.

        every_patch=False predicts the removed patches only (all the loss reads; about 30% fewer decoder FLOPs) and
        leaves exact zeros at kept ones; `count`, the patches every sample keeps if known, then spares the decoder
        a look at the mask's values (None reads them: ragged masks, eager only). The removed patches' values are
        the same either way, to fp32 rounding.
        """
        if every_patch:
            return self.decoder(x, mask).flatten(2).transpose(1, 2)
        return self.decoder.forward_removed(x, mask, count)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error on removed patches only.

        With norm_pix_loss each target patch is normalized by its own mean and (unbiased) variance, eps 1e-6,
        exactly as the official code does. The error is averaged over each patch's values, then over removed
        patches (0 when none is removed).
        """
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = (pred.float() - target).pow(2).mean(dim=-1)  # (N, L) per-patch error
        return (loss * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            imgs: (N, in_chans, H, W) normalized images, H and W multiples of 32.
            mask: (N, L), 0 is keep, 1 is remove; drawn at `mask_ratio` from the global RNG when None.
        Returns:
            loss (scalar), pred (N, L, p * p * in_chans), mask (N, L) float.

        pred: in training mode the removed patches only (all the loss reads), with 0 at kept patches (not
        computed); in eval mode (reconstruction grids) every patch. The loss is the same in both modes.

        A mask drawn here keeps the same known number of patches in every sample, so the step never waits on the
        device. A given mask is checked, and its per-sample counts read, on the host.
        """
        grid = self.encoder.check_input(imgs)
        if mask is None:
            mask = self.random_masking(imgs.shape[0], grid, device=imgs.device)
            count = kept_per_sample(grid[0] * grid[1], self.mask_ratio)
        else:
            mask = check_mask(mask, imgs.shape[0], grid, imgs.device)
            count = kept_count(mask)
        step = self._step
        if self._compiled_step is not None and self.training:  # eval (reconstruction grids) stays eager
            if count is not None:
                step = self._compiled_step
            elif not self._warned_ragged:
                part = "sparse encoder" if self.encoder.backend == "sparse" else "decoder"
                warnings.warn(f"fcmae: a mask whose samples keep different numbers of patches runs the {part} in "
                              "eager mode, not compiled", stacklevel=2)
                self._warned_ragged = True
        if step is self._compiled_step and self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may be reused
        loss, pred = step(imgs, mask, grid, count)
        return loss, pred, mask

    def _step(self, imgs: Tensor, mask: Tensor, grid: tuple[int, int], count: int | None) -> tuple[Tensor, Tensor]:
        """Encoder, decoder and loss on checked inputs: what `compile` hands to torch.compile whole.

        count: the patches every sample keeps, or None for a ragged mask (read from the mask, eager only).
        Returns the loss and pred, (N, L, p * p * in_chans): in training mode computed at removed patches only,
        0 at kept ones (the loss reads removed patches only); in eval mode every patch.
        """
        latent = self.encoder.encode(imgs, mask, grid, count)
        pred = self.forward_decoder(latent, mask, count, every_patch=not self.training)
        return self.forward_loss(imgs, pred, mask), pred

    def compile_step(self, mode: str | None = None, options: dict[str, Any] | None = None,
                     **kwargs: Any) -> "FCMAE":
        """Run the forward (encoder, decoder and loss) through `torch.compile(fullgraph=True)`; returns self.

        In training mode, masks drawn by the model (or any mask whose samples keep equal counts) run compiled: one
        graph, and no recompilation after the first step for a fixed input size and batch. A ragged mask runs the
        sparse encoder eager, with a one-line warning; eval mode (reconstruction grids) runs eager. The weights
        stay this module's own (no `_orig_mod.` prefix in the state dict).

        Args:
            mode: torch.compile's mode: "default", "reduce-overhead" (CUDA graphs: one launch replays the whole
                forward or backward, which is what small models need, see benchmarks/README.md), "max-autotune"
                or "max-autotune-no-cudagraphs". With CUDA graphs, each forward marks the start of a new step
                (`torch.compiler.cudagraph_mark_step_begin`), so a step may run while the last one's outputs are
                still held elsewhere.
            options: inductor options, over the mode's own.
            kwargs: other torch.compile arguments, e.g. backend="aot_eager" to check the graph capture without
                code generation.
        """
        kwargs.setdefault("fullgraph", True)
        kwargs.setdefault("dynamic", False)
        if kwargs.get("backend", "inductor") == "inductor":
            # torch.compile takes a mode or options, not both: spell the mode out as its options (the documented
            # way to see them) under ours and the caller's. Ours: inductor otherwise hands the depthwise conv
            # backward NCHW-strided tensors on CPU (2.6x slower there).
            from torch._inductor import list_mode_options

            merged = list_mode_options(mode or "default", kwargs["dynamic"])
            merged = {**merged, "force_layout_optimization": True, **(options or {})}
            self._cudagraphs = bool(merged.get("triton.cudagraphs"))
            kwargs["options"] = merged
        else:  # another backend ignores inductor's modes and options
            self._cudagraphs = False
            if mode is not None or options:
                raise ValueError(f"mode and options are inductor's; backend {kwargs['backend']!r} takes neither")
        self._compiled_step = torch.compile(self._step, **kwargs)
        return self


def create_model(name: str = "convnextv2_atto", **overrides: Any) -> FCMAE:
    """Build an FCMAE model by name: `FCMAE(FCMAEConfig(name, **overrides))`.

    Overrides are FCMAEConfig's fields: img_size (224), patch_size (32), in_chans (3), mask_ratio (0.6),
    decoder_depth (1), decoder_embed_dim (512), norm_pix_loss (True), drop_path_rate (0.0), backend ("sparse"),
    init ("timm" or "official"), and depths / dims for a custom size. A bad one raises a one-line ConfigError.
    """
    return FCMAE(FCMAEConfig.from_dict({"name": name, **overrides}, source="create_model's settings"))
