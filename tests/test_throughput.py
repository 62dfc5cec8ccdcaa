"""The GPU-throughput paths, checked on the CPU: compile modes, --batch-size auto, uint8 batches normalized on the
device, the device feed, persistent workers that follow the epoch, DDP and compile-cache settings."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import fcmae
from fcmae.data import CollateUnreadable, DeviceFeed, DevicePixels, collate_pixels, pretrain_dataset
from fcmae.training.batch_size import candidates, find_batch_size
from helpers import SMALL, write_photos
from test_pretrain import FAST, run

REPO = Path(__file__).resolve().parent.parent


# --- compile modes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_every_compile_mode_reaches_torch_compile(mode, monkeypatch):
    """compile_step(mode=...) raised "Either mode or options can be specified" for every mode: the mode now
    arrives as its inductor options, with ours and the caller's over them."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    model = fcmae.create_model("atto", img_size=64, **SMALL).compile_step(mode=mode, options={"epilogue_fusion": False})
    options = seen["options"]
    assert "mode" not in seen and seen["fullgraph"] and seen["dynamic"] is False
    assert options["force_layout_optimization"] and options["epilogue_fusion"] is False
    cudagraphs = mode in ("reduce-overhead", "max-autotune")
    assert bool(options.get("triton.cudagraphs")) == cudagraphs == model.replays_cuda_graphs
    assert bool(options.get("max_autotune")) == (mode or "").startswith("max-autotune")


def test_cuda_graph_steps_are_marked_and_run_the_graph(monkeypatch):
    """With CUDA graphs each training forward marks a new step (what cudagraph trees need before outputs of the
    last replay are overwritten); the graph itself runs under aot_eager here (inductor's cudagraphs need CUDA)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", fullgraph=True, dynamic=False))
    torch._dynamo.reset()
    model = fcmae.create_model("atto", img_size=64, **SMALL).compile_step(mode="reduce-overhead")
    imgs = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        model(imgs)[0].backward()
    model.eval()
    model(imgs)  # eval (reconstruction grids) runs eager: no mark
    assert len(marks) == 3


def test_compile_mode_flag(tmp_path, capsys):
    from fcmae.config import PretrainConfig, parse_config

    config = parse_config(PretrainConfig, ["--data-path", "demo", "--compile-mode", "reduce-overhead"])
    assert config.compile and config.compile_mode == "reduce-overhead"
    assert run(FAST + ["--data-path", "demo", "--output-dir", str(tmp_path / "a"), "--compile-mode", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "compile_mode must be one of default, reduce-overhead" in err


def test_cuda_graphs_with_accumulation_are_refused_in_one_line(tmp_path, capsys):
    argv = FAST + ["--data-path", "demo", "--output-dir", str(tmp_path / "a"), "--compile-mode", "reduce-overhead",
                   "--accum-steps", "2", "--max-steps", "1"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "replays CUDA graphs" in err and "accum_steps 2" in err


# --- --batch-size auto -----------------------------------------------------------------------------------------

def test_batch_size_candidates():
    assert candidates(32, 48) == [24, 16, 12, 8, 6, 4, 3, 2, 1]  # divisors of the per-process share, <= cap
    assert candidates(32, None) == [32, 16, 8, 4, 2, 1]
    assert candidates(2048, 512)[0] == 512


def test_batch_size_auto_picks_a_batch_and_prints_it(tmp_path, capsys):
    write_photos(tmp_path / "photos", 12, size=96)
    argv = FAST + ["--data-path", str(tmp_path / "photos"), "--output-dir", str(tmp_path / "run"), "--batch-size",
                   "auto", "--effective-batch-size", "12", "--max-steps", "2"]  # the last --batch-size counts
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "batch size auto: 12 per process" in out and "effective batch 12 = 12 x 1 x 1" in out
    saved = fcmae.config.load_yaml(tmp_path / "run" / "config.yaml")
    assert saved["batch_size"] == 12  # the record holds the batch that trained, not "auto"
    # a resumed run keeps the batch its checkpoint trained with
    argv[argv.index("--max-steps") + 1] = "3"
    assert run(argv + ["--resume", "auto"]) == 0
    assert "batch size auto: 12 per process, as the checkpoint being resumed trained" in capsys.readouterr().out


def test_batch_size_auto_backs_off_on_a_real_out_of_memory_error(tmp_path):
    """The address space is limited (RLIMIT_AS) so that the larger trial steps really fail to allocate: the
    CPU allocator's error is the out-of-memory the search backs off from."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import torch
        from accelerate import Accelerator
        from fcmae.training.batch_size import find_batch_size

        model = torch.nn.Conv2d(3, 64, 3, padding=1)
        def trial(n):  # about n x 100 MiB of activations
            x = torch.randn(n, 3, 400, 400)
            model(x).square().mean().backward()

        vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 1500 * 2**20, resource.RLIM_INFINITY))
        size, note = find_batch_size(trial, Accelerator(cpu=True), 0, images=1000, cap=32)
        print(size, note)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    size, note = out.stdout.split(" ", 1)
    assert 1 <= int(size) < 32 and "did not fit" in note and note.startswith(f"batch size auto: {size} per process")


def test_batch_size_auto_passes_other_errors_through():
    from accelerate import Accelerator

    def trial(n):
        raise RuntimeError("a bug, not memory")

    with pytest.raises(RuntimeError, match="a bug"):
        find_batch_size(trial, Accelerator(cpu=True), 0, images=100)


# --- uint8 batches, the device feed, persistent workers ------------------------------------------------------

def test_uint8_batches_normalized_on_the_device_give_the_same_images_and_loss(tmp_path):
    import numpy as np
    from PIL import Image

    write_photos(tmp_path / "photos", 6, size=96)
    pixels16 = (np.random.default_rng(0).random((80, 90, 3)) * 65535).astype(np.uint16)
    np.save(tmp_path / "photos" / "scan.npy", pixels16.astype(np.float32) / 65535)  # an array among photos
    Image.new("L", (70, 70), 128).save(tmp_path / "photos" / "gray.png")
    host = pretrain_dataset(str(tmp_path / "photos"), (64, 64), seed=3)
    raw = pretrain_dataset(str(tmp_path / "photos"), (64, 64), seed=3, normalize=False)
    items = range(len(host))
    dtypes = {raw[i]["image"].dtype for i in items}
    assert dtypes == {torch.uint8, torch.float32}  # photos travel as bytes, the array as floats
    expected = CollateUnreadable()([host[i] for i in items])["image"]
    batch = CollateUnreadable(collate_pixels)([raw[i] for i in items])
    images = DevicePixels("cpu", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(batch["image"])
    assert torch.equal(images, expected)  # the same operations in the same order: equal to the bit
    assert images.is_contiguous(memory_format=torch.channels_last)
    model = fcmae.create_model("atto", img_size=64, **SMALL)
    losses = []
    for x in (expected, images):
        torch.manual_seed(0)
        losses.append(model(x)[0])
    assert torch.equal(*losses)


def test_device_feed_moves_every_batch_in_order():
    batches = [{"image": torch.full((2, 3), float(i)), "unreadable": [i]} for i in range(5)]
    fed = list(DeviceFeed(lambda b: {**b, "image": b["image"] * 2}, "cpu")(iter(batches)))
    assert [b["unreadable"] for b in fed] == [[i] for i in range(5)]
    assert all(torch.equal(b["image"], torch.full((2, 3), 2.0 * i)) for i, b in enumerate(fed))


def test_persistent_workers_follow_the_epoch(tmp_path):
    """Workers kept across epochs hold their own copy of the dataset: the epoch reaches them through shared
    memory, so each epoch's augmentation is the one a fresh process computes for it."""
    write_photos(tmp_path / "photos", 4, size=96)
    dataset = pretrain_dataset(str(tmp_path / "photos"), (64, 64), seed=0, normalize=False)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True,
                        collate_fn=CollateUnreadable(collate_pixels))
    seen = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        seen.append(next(iter(loader))["image"])
    for epoch in range(3):
        fresh = pretrain_dataset(str(tmp_path / "photos"), (64, 64), seed=0, normalize=False)
        fresh.set_epoch(epoch)
        assert torch.equal(seen[epoch], torch.stack([fresh[i]["image"] for i in range(4)]))
    assert not torch.equal(seen[0], seen[1])


# --- multi-GPU settings ------------------------------------------------------------------------------------------

def test_ddp_bucket_size_and_compile_cache_come_from_the_config(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from fcmae.config import PretrainConfig, parse_config
    from fcmae.training import Run, use_compile_cache

    config = parse_config(PretrainConfig, ["--data-path", "demo", "--output-dir", str(tmp_path / "run"),
                                           "--ddp-bucket-mb", "100", "--compile-cache", str(tmp_path / "cache")])
    try:
        accelerator = Run(config, project="t").accelerator
        assert accelerator.ddp_handler.bucket_cap_mb == 100
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = use_compile_cache(config.compile_cache)
    assert cache.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(cache)  # where inductor itself now writes
