"""webdataset shards: writing, plain tar, coverage across processes and workers, corrupt samples, HTTP."""

import functools
import http.server
import json
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fcmae.data import DataError, ShardImages, ShardOrder, pretrain_dataset, pretrain_sampler
from fcmae.data.shard_writer import main as shards_main
from fcmae.data.shard_writer import write_shards
from helpers import write_photos

pytest.importorskip("wids")


@pytest.fixture
def shards(tmp_path):
    write_photos(tmp_path / "photos", 10, size=80)
    write_shards(tmp_path / "photos", tmp_path / "shards", maxcount=4)
    return tmp_path / "shards"


def images(dataset):
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def test_every_way_in_reads_the_same_samples(shards, tmp_path, capsys):
    assert sorted(p.name for p in shards.iterdir()) == ["dataset.json", "train-000000.tar", "train-000001.tar",
                                                         "train-000002.tar"]
    by_folder = pretrain_dataset(str(shards), (64, 64), seed=1)
    assert isinstance(by_folder, ShardImages) and len(by_folder) == 10 and list(by_folder.lengths) == [4, 4, 2]
    reference = images(by_folder)
    for spec in [str(shards / "train-{000000..000002}.tar"), str(shards / "dataset.json")]:
        assert torch.equal(images(pretrain_dataset(spec, (64, 64), seed=1)), reference), spec
    (shards / "dataset.json").write_text(json.dumps({"wids_version": 1, "shardlist": [
        {"url": "train-000000.tar", "nsamples": 4, "filesize": 1}]}))  # stale: counted again, not trusted
    assert len(pretrain_dataset(str(shards), (64, 64), seed=1)) == 10
    # the command line tool
    assert shards_main([str(tmp_path / "photos"), str(tmp_path / "cli"), "--maxcount", "6"]) == 0
    assert "wrote 10 samples in 2 shards" in capsys.readouterr().out
    assert shards_main([str(tmp_path / "photos"), str(tmp_path / "cli")]) == 2  # never overwrites shards
    assert "already holds train-*.tar shards" in capsys.readouterr().err


def test_shards_written_by_plain_tar_load(tmp_path):
    write_photos(tmp_path / "photos", 5, size=64)
    files = sorted((tmp_path / "photos").rglob("photo_*"))
    (tmp_path / "photos" / "photo_001.cls").write_text("3")  # another member of a sample: ignored
    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / "plain.tar"), "-C", str(tmp_path / "photos"), "."],
                   check=True)
    dataset = pretrain_dataset(str(tmp_path / "plain.tar"), (64, 64), seed=0)
    assert len(dataset) == len(files) == 5
    assert all(dataset[i]["skipped"] == 0 for i in range(5))


def test_corrupt_samples_are_skipped_and_counted_missing_shards_are_not(tmp_path):
    write_photos(tmp_path / "photos", 4, size=64)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    write_shards(tmp_path / "photos", tmp_path / "shards", maxcount=3, shuffle=False)
    dataset = pretrain_dataset(str(tmp_path / "shards"), (64, 64), seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["skipped"] for item in items] == [1, 0, 0, 0, 0]  # broken.jpg sorts first
    assert items[0]["unreadable"][0].startswith(f"{tmp_path / 'shards' / 'train-000000.tar'} sample 0: ")
    (tmp_path / "shards" / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="shard not found: .*train-000001.tar"):
        pretrain_dataset(str(tmp_path / "shards" / "dataset.json"), (64, 64), seed=0)[4]
    (tmp_path / "bad.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(DataError, match="bad.tar is not a readable tar file|no samples"):
        pretrain_dataset(str(tmp_path / "bad.tar"), (64, 64), seed=0)


class Positions(Dataset):
    """Stands in for the images: each item says which sample it is and which worker read it."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.tensor([index, get_worker_info().id])


@pytest.mark.parametrize("lengths, batch", [([7, 5, 9, 3, 8], 3), ([10, 10], 4)])
def test_two_processes_with_two_workers_see_every_sample_once(lengths, batch):
    """Accelerate's own per-process split (prepare_data_loader) of the loader pretrain.py builds, for each of 2
    processes with 2 workers each: disjoint, complete up to the documented remainder, one contiguous part each."""
    total, processes = sum(lengths), 2
    seen = {}
    for epoch in (0, 1):
        for rank in range(processes):
            sampler = ShardOrder(lengths, batch, processes, seed=7)
            loader = DataLoader(Positions(total), batch_size=batch, sampler=sampler, drop_last=True, num_workers=2)
            loader = prepare_data_loader(loader, num_processes=processes, process_index=rank, put_on_device=False)
            loader.set_epoch(epoch)
            batches = list(loader)
            AcceleratorState._reset_state(reset_partial_state=True)
            got = torch.cat(batches)
            assert len(batches) == total // (batch * processes)
            assert set(got[:, 1].tolist()) == {0, 1}  # both workers read
            seen[epoch, rank] = got[:, 0].tolist()
            assert seen[epoch, rank] == sampler.order(epoch)[rank].reshape(-1).tolist()  # its own part, in order
        together = seen[epoch, 0] + seen[epoch, 1]
        assert len(set(together)) == len(together)  # disjoint
        assert total - len(together) < batch * processes  # complete but for the remainder
    assert seen[0, 0] != seen[1, 0]  # a new order each epoch
    assert ShardOrder(lengths, batch, processes, seed=7).order(1).tolist() == ShardOrder(
        lengths, batch, processes, seed=7).order(1).tolist()  # a pure function of (seed, epoch)


def test_each_process_reads_a_few_shards_at_a_time():
    lengths = [100] * 40
    order = ShardOrder(lengths, batch_size=10, num_processes=4, seed=0, window=200).order(0)
    shards_of = np.asarray(order) // 100
    for part in shards_of:
        assert len(np.unique(part)) <= 11  # 1000 samples: 10 shards and a partial one
        for window in part.reshape(-1, 200):
            assert len(np.unique(window)) <= 3


def test_pretrain_sampler_is_only_for_shards(shards, tmp_path):
    assert isinstance(pretrain_sampler(pretrain_dataset(str(shards), (64, 64), 0), 4, 2, 0), ShardOrder)
    assert pretrain_sampler(pretrain_dataset(str(tmp_path / "photos"), (64, 64), 0), 4, 2, 0) is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="wids downloads http(s) shards with curl")
def test_shards_over_http(shards):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        reference = images(pretrain_dataset(str(shards), (64, 64), seed=2))
        remote = pretrain_dataset(f"{url}/train-{{000000..000002}}.tar", (64, 64), seed=2)
        assert torch.equal(images(remote), reference)
        assert torch.equal(images(pretrain_dataset(f"{url}/dataset.json", (64, 64), seed=2)), reference)
        with pytest.raises(DataError, match="could not download shard"):
            pretrain_dataset(f"{url}/missing-000000.tar", (64, 64), seed=2)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("channels", [1, 4])
def test_16_bit_multichannel_tiffs_read_the_same_from_folders_and_shards(tmp_path, channels):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(channels)
    (tmp_path / "cells").mkdir()
    for i in range(6):
        pixels = rng.integers(0, 65535, (70, 90, channels), dtype=np.uint16)
        tifffile.imwrite(tmp_path / "cells" / f"cell_{i}.tif", pixels, photometric="minisblack")
    np.save(tmp_path / "cells" / "cell_6.npy", rng.random((80, 80, channels), dtype=np.float32))
    write_shards(tmp_path / "cells", tmp_path / "shards", maxcount=3, shuffle=False)
    mean, std = [0.5] * channels, [0.29] * channels
    folder = pretrain_dataset(str(tmp_path / "cells"), (64, 64), seed=3, mean=mean, std=std)
    shards = pretrain_dataset(str(tmp_path / "shards"), (64, 64), seed=3, mean=mean, std=std)
    assert len(folder) == len(shards) == 7
    batch = next(iter(DataLoader(shards, batch_size=7, num_workers=2)))
    assert batch["image"].shape == (7, channels, 64, 64) and int(batch["skipped"].sum()) == 0
    assert torch.equal(batch["image"], images(folder))  # same files, same order, same seeds
    assert abs(batch["image"].mean().item()) < 0.2 and 0.5 < batch["image"].std().item() < 1.2  # normalized (noise,
    # smoothed a little by the antialiased resize)
