"""The FCMAE encoder on MinkowskiEngine sparse tensors: the optional `backend="minkowski"`.

Built as the official ConvNeXt V2 sparse encoder is: a dense stem whose output is cut down to the visible
sites, then `MinkowskiConvolution` for each 2x2 stride-2 downsampling, upstream's
`MinkowskiChannelwiseConvolution` for the 7x7 depthwise convs (same kernel layout as the official fork's depthwise
conv), and LayerNorm, Linear, GELU and GRN on the sparse tensors' features, as the official `MinkowskiLayerNorm`
and `MinkowskiGRN` do.

It owns no parameters. It runs the encoder's own timm-named ones, converting the two conv kernel layouts at every
call with the converter's maps (differentiable, so gradients land on the timm-shaped weights). A model saved
with any backend therefore loads into any other, and all backends compute one function:

  "minkowski"           GRN per sample over its visible sites, like the "sparse" and "dense" backends.
  "minkowski-official"  GRN over all points of the whole batch, as the official `MinkowskiGRN` does (official
                        issue #86), for matching the official code. Equal to "minkowski" for a batch of one.

MinkowskiEngine is imported only when one of these backends is asked for; without it that request fails with
`MinkowskiEngineUnavailable`, which names the install script.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .minkowski_kernels import dense_conv_to_me, dense_depthwise_to_me

if TYPE_CHECKING:
    import MinkowskiEngine as ME

    from .encoder import Block, SparseConvNeXtV2

__all__ = ["BACKENDS", "MinkowskiEngineUnavailable", "require", "forward_minkowski"]

BACKENDS = ("minkowski", "minkowski-official")
INSTALL_HINT = "scripts/install_minkowskiengine.sh (docs/minkowski.md)"


class MinkowskiEngineUnavailable(ImportError, ValueError):
    """The minkowski backend was asked for but MinkowskiEngine does not import. A ValueError too: for this
    environment it is a bad choice of backend, and the scripts report it as one line."""


def require():
    """Import MinkowskiEngine, or raise MinkowskiEngineUnavailable naming the install script."""
    try:
        with warnings.catch_warnings():  # a CPU build warns at every import that it is one
            warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")
            import MinkowskiEngine
    except Exception as e:  # not installed, or built for another torch (undefined symbols), ...
        reason = "is not installed" if isinstance(e, ModuleNotFoundError) else f"does not import ({_first_line(e)})"
        raise MinkowskiEngineUnavailable(
            f"the minkowski backend needs MinkowskiEngine 0.5.4, which {reason}: run {INSTALL_HINT}, or use "
            "backend sparse") from e
    return MinkowskiEngine


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def forward_minkowski(encoder: SparseConvNeXtV2, imgs: Tensor, mask: Tensor, grid: tuple[int, int],
                      batch_grn: bool = False) -> Tensor:
    """Encode the visible patches with MinkowskiEngine.

    Args:
        encoder: the encoder whose parameters are used.
        imgs: (N, in_chans, H, W), checked by `encoder.check_input`.
        mask: (N, L) float, 0 = keep, 1 = remove, checked by `check_mask`.
        grid: the patch grid (gh, gw), L = gh * gw.
        batch_grn: GRN over the whole batch (the official code) instead of per sample.
    Returns:
        (N, C_last, gh, gw) features, exact zeros at removed patches.

    MinkowskiEngine has no bfloat16 or float16 kernels, so under autocast the encoder runs in float32.
    """
    ME = require()
    weights = encoder.stem[0].weight
    if weights.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the minkowski backend runs in float32 or float64, but the weights are {weights.dtype}")
    if not (mask == 0).any():  # ME cannot hold an empty sparse tensor; the sparse path gives the zero map, in graph
        return encoder.forward_sparse(imgs, mask, grid)
    batch_size = imgs.shape[0]
    with torch.autocast(imgs.device.type, enabled=False):
        x = _visible_stem(ME, encoder, imgs.to(weights.dtype), mask, grid)
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                norm, conv = stage.downsample
                x = _conv(ME, _features(ME, x, norm), conv, dense_conv_to_me(conv.weight))
            # Blocks keep the coordinates (and their order) of the stage: look up each point's sample once.
            sample = x.C[:, 0].long().to(x.F.device)
            for block in stage.blocks:
                x = _block(ME, block, x, sample, batch_size, batch_grn)
        return _to_dense(x, batch_size, grid, encoder.total_stride)


def _visible_stem(ME, encoder: SparseConvNeXtV2, imgs: Tensor, mask: Tensor, grid: tuple[int, int]) -> ME.SparseTensor:
    """The dense stem (4x4 conv stride 4, LayerNorm), as in the official code, kept at visible sites only.

    Returns a sparse tensor of tensor stride 4 whose coordinates are (sample, row, column) in pixels. Each stem
    output reads one 4x4 block of pixels, so it never mixes removed and visible patches.
    """
    conv, norm = encoder.stem
    x = conv(imgs).permute(0, 2, 3, 1)  # (N, H/4, W/4, C)
    side = encoder.patch_size // conv.stride[0]
    visible = (mask == 0).view(-1, *grid)
    visible = visible.repeat_interleave(side, 1).repeat_interleave(side, 2)  # (N, H/4, W/4)
    sample, row, col = visible.nonzero(as_tuple=True)
    stride = conv.stride[0]
    coordinates = torch.stack([sample, row * stride, col * stride], dim=1).int()
    return ME.SparseTensor(
        norm(x[sample, row, col]), coordinates=coordinates, tensor_stride=stride, device=imgs.device,
        # Unique coordinates: keep each feature row as is (the default averages, through a sparse matmul).
        quantization_mode=ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE,
    )


def _block(ME, block: Block, x: ME.SparseTensor, sample: Tensor, batch_size: int, batch_grn: bool) -> ME.SparseTensor:
    """A ConvNeXt V2 block: dwconv 7x7 -> LN -> Linear -> GELU -> GRN -> Linear -> DropPath -> + x.

    `sample` (M,) is the sample of each of x's M points, `batch_size` the number of samples N.
    """
    mlp = block.mlp
    y = _conv(ME, x, block.conv_dw, dense_depthwise_to_me(block.conv_dw.weight))
    y = ME.MinkowskiFunctional.linear(_features(ME, y, block.norm), mlp.fc1.weight, mlp.fc1.bias)
    y = ME.MinkowskiFunctional.gelu(y)
    y = _grn(ME, y, mlp.grn.weight, mlp.grn.bias, mlp.grn.eps, None if batch_grn else (sample, batch_size))
    y = ME.MinkowskiFunctional.linear(y, mlp.fc2.weight, mlp.fc2.bias)
    y = _drop_path(ME, y, block.drop_prob, block.training, sample, batch_size)
    return _features(ME, x, lambda f: f + y.F)


def _features(ME, x: ME.SparseTensor, fn: Callable[[Tensor], Tensor]) -> ME.SparseTensor:
    """A per-site op (LayerNorm, residual) on the features of `x`, on the same coordinates."""
    return ME.SparseTensor(fn(x.F), coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


def _grn(ME, x: ME.SparseTensor, weight: Tensor, bias: Tensor, eps: float,
         samples: tuple[Tensor, int] | None) -> ME.SparseTensor:
    """GRN on sparse features (M, C): Gx = L2 norm of each channel over the points of a sample, given `samples` =
    (the sample of each point, N); over all points of the batch when `samples` is None, as the official
    MinkowskiGRN does. Nx = Gx / (mean_c Gx + eps), out = x + weight * (x * Nx) + bias.
    """
    feats = x.F
    if samples is None:
        gx = torch.linalg.vector_norm(feats, dim=0, keepdim=True)  # (1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    else:
        sample, batch_size = samples
        squares = feats.new_zeros(batch_size, feats.shape[1]).index_add_(0, sample, feats * feats)
        gx = squares.sqrt()  # (N, C)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + eps)).index_select(0, sample)
    return _features(ME, x, lambda f: f + weight * (f * nx) + bias)


def _drop_path(ME, x: ME.SparseTensor, drop_prob: float, training: bool, sample: Tensor,
               batch_size: int) -> ME.SparseTensor:
    """Stochastic depth per sample, drawing N Bernoulli numbers as timm's DropPath and the sparse backend do."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.F.new_empty(batch_size, 1).bernoulli_(keep_prob).div_(keep_prob)
    return _features(ME, x, lambda f: f * keep.index_select(0, sample))


def _to_dense(x: ME.SparseTensor, batch_size: int, grid: tuple[int, int], stride: int) -> Tensor:
    """Points of tensor stride `stride` -> (N, C, gh, gw), exact zeros where no point is."""
    coords = x.C.long().to(x.F.device)
    out = x.F.new_zeros(batch_size, *grid, x.F.shape[1])
    out = out.index_put((coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride), x.F)
    return out.permute(0, 3, 1, 2)


# ME convolutions with the encoder's weights ------------------------------------------------------------------

# One weight-free ME layer per nn.Conv2d of an encoder, made on first use. Weak keys: it goes with the conv.
_LAYERS: weakref.WeakKeyDictionary[nn.Conv2d, nn.Module] = weakref.WeakKeyDictionary()


def _conv(ME, x: ME.SparseTensor, conv: nn.Conv2d, kernel: Tensor) -> ME.SparseTensor:
    """Run `conv` as an ME convolution on `x` (a channel-wise one, submanifold: outputs on x's coordinates, when it
    is depthwise). `kernel` is conv.weight in ME's layout."""
    layer = _LAYERS.get(conv)
    if layer is None:
        size, stride = conv.kernel_size[0], conv.stride[0]
        with torch.random.fork_rng(devices=[]):  # ME's init draws weights we drop: leave the RNG (drop path) alone
            layer = _make_layer(ME, conv, size, stride)
        del layer.kernel, layer.bias  # bound to the encoder's weights at each call instead
        _LAYERS[conv] = layer
    # Plain tensor attributes, not Parameters: ME's own forward reads them, autograd reaches conv.weight/bias.
    layer.kernel, layer.bias = kernel, conv.bias.view(1, -1)
    try:
        return layer(x)
    finally:
        layer.kernel = layer.bias = None


def _make_layer(ME, conv: nn.Conv2d, size: int, stride: int) -> nn.Module:
    """The ME layer for `conv`: channel-wise for a depthwise conv, else a MinkowskiConvolution."""
    if conv.groups > 1:
        return ME.MinkowskiChannelwiseConvolution(conv.in_channels, kernel_size=size, stride=stride, bias=True,
                                                  dimension=2)
    return ME.MinkowskiConvolution(conv.in_channels, conv.out_channels, kernel_size=size, stride=stride, bias=True,
                                   dimension=2)
