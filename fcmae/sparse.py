"""A compact layout for the visible patches of masked images, and the ops on it that need neighbours or sums.

Submanifold semantics: a removed patch does not exist. An op computes outputs at visible sites only, a
neighbourhood op sees zeros where removed sites would be, and a per-sample sum runs over visible sites only.

Layout. A batch of feature maps at one stage is held as a tensor of shape (P, k, k, C):
  P  visible patches of the whole batch, sorted by sample, then in raster order within the sample;
  k  feature-map sites per patch side at this stage (patch_size / stride: 8, 4, 2, 1 for ConvNeXt);
  C  channels, last, so that LayerNorm and Linear layers apply to it unchanged.
Per-site ops (LayerNorm, Linear, GELU, residuals) need nothing from this module. Nothing here knows ConvNeXt.

The depthwise conv has several implementations of one function (see `set_depthwise_impl`); the default picks the
fastest measured one per device and stage.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grad_strides import in_param_strides

__all__ = ["VisiblePatches", "PatchIndex", "strided_conv", "kept_count", "compute_dtype", "DEPTHWISE_IMPLS",
           "set_depthwise_impl", "depthwise_impl"]

DEPTHWISE_IMPLS = ("auto", "canvas", "gather", "tiles")
_depthwise_impl = "auto"


def set_depthwise_impl(name: str) -> None:
    """Choose how `VisiblePatches.depthwise_conv` runs, for every model in this process.

    All compute the same function (to floating-point rounding) and the same gradients:
      "canvas"  scatter the visible sites onto a zeroed dense (N, H, W, C) canvas, run one native depthwise conv
                over all of it, gather the visible outputs: one kernel each way, but the conv's work is that of the
                whole canvas (2.5x the visible sites at mask ratio 0.6), and its backward keeps the canvas.
      "gather"  out[s] = bias + sum_t w[t] * x[neighbour(s, t)] over the kh * kw taps t: a loop of row gathers and
                multiply-adds over the visible sites only, through a (kh * kw, P * k * k) neighbour index built
                once per mask and stage. Its backward is the same kind of loop (grad_x uses the flipped kernel, as
                the neighbour relation is symmetric), with no scatter-add. Under torch.compile, inductor fuses each
                loop into one kernel.
      "tiles"   gather each visible patch with a halo of kernel_size // 2 sites (zeros where removed or off the
                image) and run native depthwise convs without padding on these (k + 2r) x (k + 2r) tiles: the conv
                work of the visible sites only, for a halo of ((k + 2r) / k)^2 times the patch in memory (3x at
                k = 8, 16x at k = 2). Its backward is two such convs (grad_x with the flipped kernel).
      "auto"    (the default) per device and stage, the fastest measured (benchmarks/depthwise_conv.py): see
                `depthwise_impl`.
    torch.compile guards on this setting: changing it recompiles a compiled model at its next call.
    """
    global _depthwise_impl
    if name not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise conv implementation {name!r}; choose one of {', '.join(DEPTHWISE_IMPLS)}")
    _depthwise_impl = name


def depthwise_impl(device: torch.device, side: int, reach: int) -> str:
    """The implementation `depthwise_conv` runs on `device` for patches of side k = `side` sites and a kernel that
    reaches `reach` sites from its centre (3 for 7x7).

    "auto" resolves to (benchmarks/README.md has the measurements):
      CPU, k > reach          "tiles" (the halo is at most 6.25x the patch), eager or compiled;
      CPU, k <= reach         "gather" when compiled or on one thread; "canvas" eagerly on more threads, where each
                              of the gather loop's small ops pays for a parallel region (measured 5x slower than the
                              canvas on 2 threads of a busy machine, and 1.2x faster on one);
      CUDA, compiled          "gather": inductor fuses the kh * kw taps into one kernel over the visible sites;
      CUDA, eager             "canvas", the only one measured on CUDA so far (eagerly, "gather" launches two
                              kernels per tap; "tiles" is untried there).
    """
    if _depthwise_impl != "auto":
        return _depthwise_impl
    compiling = torch.compiler.is_compiling()
    if device.type == "cpu":
        if side > reach:
            return "tiles"
        return "gather" if compiling or torch.get_num_threads() == 1 else "canvas"
    return "gather" if compiling else "canvas"


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
        self._depthwise_index: dict[tuple, Tensor] = {}  # see neighbour_index and tile_index

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

    def depthwise_conv(self, x: Tensor, conv: nn.Conv2d, impl: str | None = None) -> Tensor:
        """Submanifold depthwise conv: (P, k, k, C) -> (P, k, k, C).

        Removed sites and sites off the image read as zeros, and only visible sites get an output. `conv` must be
        depthwise with stride 1, an odd kernel and padding that keeps the site grid ("same"); any dilation.
        `impl` overrides the module's setting (see `set_depthwise_impl`) for this call.

        Under autocast, x, the weight and the bias are cast to the autocast dtype first, as autocast casts a conv's
        inputs (and the canvas is built, and zero-filled, in that dtype rather than in fp32 and then cast whole).
        """
        reach = conv_reach(conv)
        x = x.to(compute_dtype(x))
        weight = in_param_strides(conv.weight).to(x.dtype)
        bias = conv.bias.to(x.dtype) if conv.bias is not None else None
        impl = impl or depthwise_impl(x.device, self.side, max(reach))
        if impl == "canvas" or self.num_visible == 0:
            canvas = self.scatter(x).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
            out = F.conv2d(canvas, weight, bias, 1, reach, conv.dilation, conv.groups)
            return self.gather(out.permute(0, 2, 3, 1))
        if impl == "gather":
            taps = weight.flatten(1).t().contiguous()  # (C, 1, kh, kw) -> (kh * kw, C)
            neighbours = self.neighbour_index(conv.kernel_size, conv.dilation)
            out = _GatherDepthwise.apply(x.reshape(-1, x.shape[-1]), taps, bias, neighbours)
            return out.view(x.shape)
        if impl == "tiles":
            tiles = self.tile_index(reach)
            return _TileDepthwise.apply(x, weight, bias, tiles, conv.dilation)
        raise ValueError(f"unknown depthwise conv implementation {impl!r}; choose one of {', '.join(DEPTHWISE_IMPLS)}")

    # Index maps of the depthwise conv, built once per mask and stage (every block of a stage shares them) --------

    def neighbour_index(self, kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Tensor:
        """(kh * kw, P * k * k) compact row of each visible site's neighbour at each kernel tap, in raster order of
        the taps; P * k * k (the zero row appended past the last site) where the neighbour is removed or off the
        image. Tap (a, b) of site (y, x) is the site (y + (a - kh // 2) * dh, x + (b - kw // 2) * dw).

        Read off the tile index (the neighbours of a patch's sites are its tile's sites): one gather of small
        integers, instead of (kh * kw, P * k * k) coordinate arithmetic.
        """
        key = ("neighbours", tuple(kernel_size), tuple(dilation))
        if key not in self._depthwise_index:
            (kh, kw), (dh, dw), k = kernel_size, dilation, self.side
            reach = (dh * (kh // 2), dw * (kw // 2))
            tile_width = k + 2 * reach[1]
            tiles = self.tile_index(reach).view(self.num_visible, -1)  # (P, th * tw)
            device = tiles.device
            i = torch.arange(k, device=device)
            tap_row = torch.arange(kh, device=device)[:, None, None, None] * dh + i[:, None]  # (kh, 1, k, 1)
            tap_col = torch.arange(kw, device=device)[:, None, None] * dw + i  # (kw, 1, k)
            in_tile = (tap_row * tile_width + tap_col).flatten()  # (kh, kw, k, k): tile site of tap (a, b), site (i, j)
            neighbours = tiles.index_select(1, in_tile).view(self.num_visible, kh * kw, k * k)
            self._depthwise_index[key] = neighbours.transpose(0, 1).reshape(kh * kw, -1)
        return self._depthwise_index[key]

    def tile_index(self, reach: tuple[int, int]) -> Tensor:
        """(P * (k + 2 rh) * (k + 2 rw),) compact row of every site of every visible patch's tile: the patch with a
        halo of reach = (rh, rw) sites each side, in raster order; P * k * k (a zero row) where the site is removed
        or off the image."""
        key = ("tiles", tuple(reach))
        if key not in self._depthwise_index:
            (rh, rw), k = reach, self.side
            device = self.site_index.device
            corner = self.site_index.view(self.num_visible, k * k)[:, 0]  # each patch's top-left site
            first_site, y, x = self._dense_coordinates(corner)
            ty = torch.arange(-rh, k + rh, device=device)[:, None]
            tx = torch.arange(-rw, k + rw, device=device)[None, :]
            rows = self._compact_rows(first_site[:, None, None], y[:, None, None] + ty, x[:, None, None] + tx)
            self._depthwise_index[key] = rows.flatten()
        return self._depthwise_index[key]

    def _dense_coordinates(self, site_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flat dense indices -> (flat index of the sample's first site, row y, column x), each of their shape."""
        height, width = self.dense_size
        y = site_index // width % height
        x = site_index % width
        return site_index - y * width - x, y, x

    def _compact_rows(self, first_site: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """The compact row (index into (P * k * k, C)) of the dense site (y, x) of the sample whose map starts at
        flat index first_site, broadcast together; P * k * k where that site is removed or off the map. int32 (half
        the memory of int64; index_select takes either) unless the batch has 2^31 sites."""
        height, width = self.dense_size
        num_sites = self.site_index.numel()
        dtype = torch.int32 if self.batch_size * height * width < 2**31 - 1 else torch.int64
        row_of_site = torch.full((self.batch_size * height * width,), num_sites, dtype=dtype, device=y.device)
        row_of_site.index_copy_(0, self.site_index, torch.arange(num_sites, dtype=dtype, device=y.device))
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        flat = first_site + y.clamp(0, height - 1) * width + x.clamp(0, width - 1)
        return torch.where(inside, row_of_site[flat], num_sites)

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


def conv_reach(conv: nn.Conv2d) -> tuple[int, int]:
    """(rh, rw), how many sites a depthwise conv that keeps the site grid reaches from its centre: 3, 3 for a 7x7.

    ValueError for a conv that is not depthwise, has a stride, an even kernel, or padding other than "same".
    """
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    reach = (dh * (kh // 2), dw * (kw // 2))
    same = conv.padding == "same" or tuple(conv.padding) == reach
    if not (conv.groups == conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1) and kh % 2 == 1
            and kw % 2 == 1 and same and conv.padding_mode == "zeros"):
        raise ValueError(f"depthwise_conv needs a depthwise conv with stride 1, an odd kernel and zero padding that "
                         f"keeps the size ('same'), got {conv}")
    return reach


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of bf16 or fp16 products run in fp32, as a native conv kernel's do."""
    return torch.promote_types(dtype, torch.float32)


def _tap_sum(x: Tensor, taps: Tensor, neighbours: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[s] = bias + sum_t taps[t] * x[neighbours[t, s]], with row S of x (one past the end) read as zeros.

    x: (S, C); taps: (T, C); neighbours: (T, S); bias: (C,) or None. Returns (S, C) in x's dtype, summed in fp32
    at least. Eagerly a loop of T row gathers into one reused buffer (a fresh one per tap would page-fault every
    time with glibc's default allocator) and in-place multiply-adds; compiled, the functional loop, which inductor
    fuses into one kernel.
    """
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
    dtype = _accumulation_dtype(x.dtype)
    if bias is not None:
        out = bias.to(dtype).expand(x.shape).clone()
    else:
        out = x.new_zeros(x.shape, dtype=dtype)
    if torch.compiler.is_compiling():
        for t in range(len(taps)):
            out = torch.addcmul(out, padded.index_select(0, neighbours[t]), taps[t])
    else:
        rows = torch.empty_like(x)
        for t in range(len(taps)):
            out.addcmul_(torch.index_select(padded, 0, neighbours[t], out=rows), taps[t])
    return out.to(x.dtype)


def _tap_products(grad_out: Tensor, x: Tensor, neighbours: Tensor) -> Tensor:
    """grad_taps[t, c] = sum_s grad_out[s, c] * x[neighbours[t, s], c], row S of x read as zeros.

    grad_out, x: (S, C); neighbours: (T, S). Returns (T, C) in x's dtype, summed in fp32 at least. Compiled, one
    reduction over the gathered (T, S, C) products, which inductor fuses without materializing them.
    """
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
    dtype = _accumulation_dtype(x.dtype)
    num_taps, num_sites = neighbours.shape
    if torch.compiler.is_compiling():
        gathered = padded.index_select(0, neighbours.flatten()).view(num_taps, num_sites, x.shape[1])
        return (gathered * grad_out).sum(1, dtype=dtype).to(x.dtype)
    out = x.new_empty(num_taps, x.shape[1], dtype=dtype)
    rows = torch.empty_like(x)
    for t in range(num_taps):
        torch.index_select(padded, 0, neighbours[t], out=rows)
        torch.sum(rows.mul_(grad_out), 0, dtype=dtype, out=out[t])
    return out.to(x.dtype)


class _GatherDepthwise(torch.autograd.Function):
    """Depthwise conv over the visible sites as a sum of shifted row gathers: (S, C) -> (S, C).

    The backward gathers too: as site t is s's neighbour at tap j exactly when s is t's neighbour at the flipped
    tap, grad_x[s] = sum_j taps[flip(j)] * grad_out[neighbours[j, s]]. No scatter-add (atomic and non-deterministic
    on CUDA), and only x and the index are saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor, bias: Tensor | None, neighbours: Tensor) -> Tensor:
        ctx.save_for_backward(x, taps, neighbours)
        return _tap_sum(x, taps, neighbours, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, taps, neighbours = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = _tap_sum(grad_out, taps.flip(0), neighbours) if ctx.needs_input_grad[0] else None
        grad_taps = _tap_products(grad_out, x, neighbours) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0, dtype=_accumulation_dtype(grad_out.dtype)).to(grad_out.dtype)
        return grad_x, grad_taps, grad_bias, None


def _tiles(x: Tensor, tile_index: Tensor, reach: tuple[int, int]) -> Tensor:
    """(P, k, k, C) -> (P, C, k + 2 rh, k + 2 rw): the haloed tiles, an NCHW view of channels-last memory."""
    num_patches, side, _, channels = x.shape
    rows = torch.cat([x.reshape(-1, channels), x.new_zeros(1, channels)]).index_select(0, tile_index)
    return rows.view(num_patches, side + 2 * reach[0], side + 2 * reach[1], channels).permute(0, 3, 1, 2)


class _TileDepthwise(torch.autograd.Function):
    """Depthwise conv over the visible sites as native unpadded convs on haloed tiles: (P, k, k, C) -> (P, k, k, C).

    The backward is two native convs on tiles: grad_x with the flipped kernel on the tiles of grad_out (the same
    symmetry as `_GatherDepthwise`), and the weight and bias grads of the forward conv. Only x and the index are
    saved; the tiles are gathered again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tile_index: Tensor,
                dilation: tuple[int, int]) -> Tensor:
        reach = ((weight.shape[2] // 2) * dilation[0], (weight.shape[3] // 2) * dilation[1])
        ctx.save_for_backward(x, weight, tile_index)
        ctx.reach, ctx.dilation, ctx.has_bias = reach, dilation, bias is not None
        out = F.conv2d(_tiles(x, tile_index, reach), weight, bias, 1, 0, dilation, x.shape[-1])
        return out.permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, tile_index = ctx.saved_tensors
        channels = x.shape[-1]
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_tiles = _tiles(grad_out, tile_index, ctx.reach)
            grad_x = F.conv2d(grad_tiles, weight.flip(-2, -1), None, 1, 0, ctx.dilation, channels)
            grad_x = grad_x.permute(0, 2, 3, 1).contiguous()
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out.permute(0, 3, 1, 2), _tiles(x, tile_index, ctx.reach), weight,
                [channels] if ctx.has_bias else None, [1, 1], [0, 0], list(ctx.dilation), False, [0, 0], channels,
                [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
            )
        return grad_x, grad_weight, grad_bias, None, None
