"""The sparse depthwise conv's implementations ("gather", "tiles") against the canvas conv they replace.

The canvas implementation scatters the visible sites onto a zeroed dense map and runs the native conv over it:
the reference here. The others must give the same outputs and the same x, weight and bias gradients (fp32
rounding; bf16 rounding under autocast), at every stage's patch side, on uniform and ragged masks.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fcmae
from fcmae import sparse
from fcmae.sparse import VisiblePatches, depthwise_impl, set_depthwise_impl

from helpers import SMALL, randomize_, rel_err

IMPLS = ["gather", "tiles"]


@pytest.fixture(autouse=True)
def restore_setting():
    """Each test starts from, and leaves, the default "auto"."""
    set_depthwise_impl("auto")
    yield
    set_depthwise_impl("auto")


def make_layout(grid, side, batch_size=3, ragged=False, seed=0):
    """A stage layout for a random mask that keeps about half the patches (ragged: one sample keeps one more)."""
    gen = torch.Generator().manual_seed(seed)
    mask = fcmae.random_mask(batch_size, grid, 0.5, generator=gen)
    if ragged:
        mask[0, mask[0].argmax()] = 0.0  # sample 0 keeps one patch more than the others
        return VisiblePatches(mask, grid, side)
    return VisiblePatches(mask, grid, side, count=int((mask[0] == 0).sum()))


def make_conv(channels, kernel_size=7, dilation=1, seed=0):
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    padding = tuple(dilation * (k // 2) for k in kernel)
    conv = nn.Conv2d(channels, channels, kernel, padding=padding, dilation=dilation, groups=channels)
    return randomize_(conv, seed)


def conv_and_grads(layout, conv, x, upstream, impl):
    """Output and the x, weight and bias grads of one depthwise conv with a fixed upstream gradient."""
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layout.depthwise_conv(x, conv, impl)
    (out.float() * upstream).sum().backward()
    return out.detach(), x.grad, conv.weight.grad, conv.bias.grad


def assert_matches_canvas(layout, conv, impl, tol=1e-5, seed=1, autocast=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(layout.num_visible, layout.side, layout.side, conv.in_channels, generator=gen)
    upstream = torch.randn(x.shape, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = conv_and_grads(layout, conv, x, upstream, "canvas")
        got = conv_and_grads(layout, conv, x, upstream, impl)
    for name, a, b in zip(("out", "x grad", "weight grad", "bias grad"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a.float(), b.float()) <= tol, (name, rel_err(a.float(), b.float()))
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side", [8, 4, 2, 1])
@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
def test_equals_canvas_at_every_stage(impl, side, ragged):
    layout = make_layout((3, 2), side, ragged=ragged, seed=side)  # non-square grid
    assert layout.uniform != ragged
    assert_matches_canvas(layout, make_conv(6, seed=side), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), (5, 1), ((3, 5), 1), (3, 2), (9, 1)])
def test_equals_canvas_for_other_kernels(impl, kernel_size, dilation):
    layout = make_layout((2, 3), 4, batch_size=2)
    assert_matches_canvas(layout, make_conv(5, kernel_size, dilation), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side", [8, 2])
def test_equals_canvas_under_bf16_autocast(impl, side):
    layout = make_layout((2, 2), side)
    out, *_ = assert_matches_canvas(layout, make_conv(8), impl, tol=2e-2, autocast=True)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
def test_removed_neighbours_read_as_zeros(impl):
    """Values at removed sites never reach visible outputs: a brute-force submanifold conv, site by site."""
    layout = make_layout((2, 2), 2, batch_size=2, ragged=True)
    conv = make_conv(3, kernel_size=5)
    x = torch.randn(layout.num_visible, 2, 2, 3)
    dense = layout.scatter(x)  # exact zeros at removed sites
    padded = nn.functional.pad(dense, (0, 0, 2, 2, 2, 2))
    weight = conv.weight[:, 0].permute(1, 2, 0)  # (5, 5, C)
    expected = torch.stack([
        (padded[n, y:y + 5, w:w + 5] * weight).sum((0, 1)) + conv.bias
        for n, y, w in zip(*torch.unravel_index(layout.site_index, (2, *layout.dense_size)))
    ]).view(x.shape)
    assert rel_err(layout.depthwise_conv(x, conv, impl).detach(), expected.detach()) <= 1e-6


class OpLog(TorchDispatchMode):
    """The names of the aten ops that run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_gathers_and_keeps_no_canvas(impl):
    """No scatter-add in the backward (atomic and non-deterministic on CUDA), and nothing of the dense map's size
    is kept for it: what the canvas conv keeps is 2.5x the visible sites at mask ratio 0.6."""
    layout = make_layout((3, 3), 4, batch_size=2)
    conv = make_conv(4)
    x = torch.randn(layout.num_visible, 4, 4, 4, requires_grad=True)
    dense_numel = layout.batch_size * layout.dense_size[0] * layout.dense_size[1] * 4
    saved = []  # sizes of the float tensors kept for the backward (the index maps are integers, kept per stage)

    def keep(t):
        return saved.append(t.numel() if t.is_floating_point() else 0) or t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = layout.depthwise_conv(x, conv, impl)
    assert max(saved) < dense_numel
    with OpLog() as log:
        out.sum().backward()
    assert not {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_"} & set(log.ops)

    saved.clear()  # the reference does keep its canvas
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layout.depthwise_conv(x, conv, "canvas")
    assert max(saved) == dense_numel


def test_index_is_built_once_per_stage():
    layout = make_layout((2, 2), 4)
    neighbours = layout.neighbour_index((7, 7))
    assert layout.neighbour_index((7, 7)) is neighbours and layout.tile_index((3, 3)) is layout.tile_index((3, 3))
    num_sites = layout.num_visible * 16
    assert neighbours.shape == (49, num_sites) and neighbours.dtype == torch.int32
    assert neighbours[24].equal(torch.arange(num_sites, dtype=torch.int32))  # the centre tap is the site itself
    assert layout.downsampled().neighbour_index((7, 7)).shape == (49, layout.num_visible * 4)


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
def test_whole_model_loss_and_grads_equal_canvas(impl):
    torch.manual_seed(0)
    model = randomize_(fcmae.create_model("atto", img_size=64, **SMALL))
    gen = torch.Generator().manual_seed(3)
    imgs = torch.randn(3, 3, 64, 64, generator=gen)
    uniform = fcmae.random_mask(3, (2, 2), 0.5, generator=gen)
    ragged = torch.tensor([[0.0, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0]])
    for mask in (uniform, ragged):
        results = {}
        for name in ("canvas", impl):
            set_depthwise_impl(name)
            model.zero_grad(set_to_none=True)
            loss, _, _ = model(imgs, mask)
            loss.backward()
            results[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        (loss, grads), (ref_loss, ref_grads) = results[impl], results["canvas"]
        assert rel_err(loss, ref_loss) <= 1e-5
        for name, grad in ref_grads.items():
            assert rel_err(grads[name], grad) <= 1e-5, name


@pytest.mark.parametrize("impl", IMPLS)
def test_compiles_in_one_graph(impl):
    """torch.compile(fullgraph=True, dynamic=False) takes index building, forward and backward (aot_eager: graph
    capture and the joint graph, without inductor's minutes of code generation on CPU)."""
    torch._dynamo.reset()
    conv = make_conv(6)
    grid, side = (2, 3), 4

    def two_blocks(x, mask):
        layout = VisiblePatches(mask, grid, side, count=3)
        y = layout.depthwise_conv(x, conv, impl)
        return layout.depthwise_conv(y.relu(), conv, impl)  # the second call reuses the stage's index

    compiled = torch.compile(two_blocks, backend="aot_eager", fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        mask = fcmae.random_mask(2, grid, 0.5, generator=gen)
        x = torch.randn(6, side, side, 6, generator=gen)
        results = []
        for fn in (two_blocks, compiled):
            conv.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_(True)
            out = fn(xg, mask)
            out.square().sum().backward()
            results.append((out.detach(), xg.grad, conv.weight.grad, conv.bias.grad))
        for a, b in zip(*results):
            assert rel_err(a, b) <= 1e-5


def test_auto_picks_per_device_and_stage_and_is_overridable():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert [depthwise_impl(cpu, side, 3) for side in (8, 4, 2, 1)] == ["tiles", "tiles", "gather", "gather"]
        torch.set_num_threads(2)
        assert [depthwise_impl(cpu, side, 3) for side in (8, 4, 2, 1)] == ["tiles", "tiles", "canvas", "canvas"]
    finally:
        torch.set_num_threads(threads)
    assert depthwise_impl(cuda, 8, 3) == "canvas"
    seen = {}

    def probe(x):
        seen["cuda"], seen["cpu"] = depthwise_impl(cuda, 8, 3), [depthwise_impl(cpu, side, 3) for side in (8, 2)]
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(1))
    assert seen == {"cuda": "gather", "cpu": ["tiles", "gather"]}  # compiled: inductor fuses the gathers
    set_depthwise_impl("gather")
    assert depthwise_impl(cpu, 8, 3) == depthwise_impl(cuda, 8, 3) == "gather"
    assert sparse._depthwise_impl == "gather"


def test_bad_settings_and_convs_raise_one_line_errors():
    with pytest.raises(ValueError, match="unknown depthwise conv implementation 'fast'; choose one of auto, canvas"):
        set_depthwise_impl("fast")
    layout = make_layout((2, 2), 4)
    x = torch.randn(layout.num_visible, 4, 4, 6)
    for conv in (nn.Conv2d(6, 6, 7, padding=3, groups=6, stride=2), nn.Conv2d(6, 6, 4, padding=2, groups=6),
                 nn.Conv2d(6, 6, 7, padding=2, groups=6), nn.Conv2d(6, 6, 7, padding=3, groups=3)):
        with pytest.raises(ValueError, match="needs a depthwise conv with stride 1, an odd kernel") as error:
            layout.depthwise_conv(x, conv)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown depthwise conv implementation 'fast'"):
        layout.depthwise_conv(x, make_conv(6), "fast")


@pytest.mark.parametrize("impl", ["canvas", *IMPLS])
def test_weight_gradients_come_back_in_the_weights_strides(impl):
    """pretrain.py stores conv weights channels-last. Every parameter's gradient must have the parameter's strides,
    even on size-1 dims (depthwise and 1x1 weights), or DDP warns on every multi-GPU run that the gradients do not
    match its buckets. Autograd ignores those strides, so the gradients show what each op computed."""
    set_depthwise_impl(impl)
    model = fcmae.FCMAE(fcmae.FCMAEConfig(**SMALL, decoder_depth=1))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model(images)[0].backward()
    mismatched = {name: (tuple(p.grad.stride()), p.stride()) for name, p in model.named_parameters()
                  if p.grad is not None and p.grad.stride() != p.stride()}
    assert not mismatched
