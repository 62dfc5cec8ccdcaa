"""Image folders, real-world image formats, unreadable files and seeded augmentation."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_STD

from fcmae.data import (
    CollateUnreadable, DataError, ImageFiles, eval_transform, find_images, find_labeled_images, load_rgb,
    pretrain_dataset, walk_images, pretrain_transform,
)
from helpers import write_photos


def test_find_images_is_recursive_and_uses_train_subfolder(tmp_path):
    write_photos(tmp_path / "train", 5)
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    write_photos(tmp_path / "val", 2)
    assert len(find_images(tmp_path / "train")) == 5
    assert len(pretrain_dataset(str(tmp_path), (64, 64), seed=0)) == 5  # <path>/train wins


def test_symlinked_folders_are_followed_once_and_hidden_entries_skipped(tmp_path):
    write_photos(tmp_path / "elsewhere" / "cat", 3)
    data = tmp_path / "data"
    write_photos(data / "dog", 2)
    (data / "cat").symlink_to(tmp_path / "elsewhere" / "cat", target_is_directory=True)  # a linked-in class
    (data / "dog" / "loop").symlink_to(data, target_is_directory=True)  # link loops must not hang the scan
    (tmp_path / "b").mkdir()  # and a cycle through a folder outside: dog/nested -> b -> dog/nested
    (data / "dog" / "nested" / "to_b").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "b" / "to_nested").symlink_to(data / "dog" / "nested", target_is_directory=True)
    write_photos(data / "dog" / ".ipynb_checkpoints", 2)
    (data / "dog" / "._macos_resource_fork.png").write_bytes(b"\x00\x05\x16\x07")
    files, labels, classes = find_labeled_images(data)
    assert classes == ["cat", "dog"] and sorted(labels) == [0, 0, 0, 1, 1] and len(files) == 5
    assert len(find_images(data)) == 5


LOOP = "too many levels of symbolic links"  # the OS's words for ELOOP


def test_looping_links_are_skipped_with_one_warning_per_scan(tmp_path, capsys):
    """Issue 22 B: a link to itself made is_dir() raise ELOOP, which ended the whole scan."""
    data = tmp_path / "data"
    write_photos(data / "cat", 3)
    write_photos(data / "dog", 2)
    (data / "dog" / "x.jpg").symlink_to("x.jpg")
    (data / "dog" / "y.png").symlink_to("y.png")
    (data / "cat" / "a").symlink_to("b")  # a -> b -> a
    (data / "cat" / "b").symlink_to("a")
    files, labels, classes = find_labeled_images(data)
    assert classes == ["cat", "dog"] and sorted(labels) == [0, 0, 0, 1, 1] and len(files) == 5
    assert len(find_images(data)) == 5
    assert len(pretrain_dataset(str(data), (64, 64), seed=0)) == 5  # the folder's FileIndex, built
    assert len(pretrain_dataset(str(data), (64, 64), seed=0)) == 5  # and loaded from its cache: the warning again
    warning = (f"warning: skipped 4 unreadable folder(s) or link(s) under {data}, their images left out: "
               f"cat/a ({LOOP}), cat/b ({LOOP}), dog/x.jpg ({LOOP}) and 1 more")
    assert capsys.readouterr().err.splitlines() == [warning] * 4


# Run in a child process that drops root (which reads any folder) once its imports are done: the interpreter
# lives under /root, which the other user cannot read.
SCAN_AS_ANOTHER_USER = """
import encodings.cp437, json, os, sys, zipfile  # what np.savez and np.load import when first called
from fcmae.data import FileIndex, find_images, find_labeled_images
root, cache, locked = sys.argv[1], sys.argv[2], sys.argv[3:]
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)  # nobody
counts = [len(find_images(root)), len(find_labeled_images(root)[0])]
indexes = []
for unlock in (False, False, True):  # the index built, loaded from its cache, rebuilt once the folders are readable
    for folder in locked if unlock else []:
        os.chmod(os.path.join(root, folder), 0o755)
    counts.append(len(FileIndex.load(root, cache)))
    indexes.append(os.stat(cache).st_ino)  # os.replace writes a new file
print(json.dumps({"counts": counts, "index_files": len(set(indexes[:2])), "rebuilt": indexes[2] != indexes[1]}))
"""


def test_unreadable_folders_are_reported_once_per_scan_and_by_the_cached_index():
    """Issue 22 A: a folder os.scandir could not read was skipped without a word, its images missing."""
    with tempfile.TemporaryDirectory() as tmp:  # not tmp_path: pytest's base folder is private to root
        os.chmod(tmp, 0o755)
        data = Path(tmp) / "data"
        write_photos(data / "cat", 2)
        write_photos(data / "dog", 2)
        write_photos(data / "cat" / "private", 1)
        write_photos(data / "dog" / "locked", 2)
        locked = ["cat/private", "dog/locked"]
        (Path(tmp) / "cache").mkdir()
        os.chmod(Path(tmp) / "cache", 0o777)
        for folder in locked:
            if os.geteuid() == 0:
                os.chown(data / folder, 65534, 65534)  # nobody may chmod it back
            os.chmod(data / folder, 0)
        env = {k: v for k, v in os.environ.items() if k != "RANK"}
        result = subprocess.run([sys.executable, "-c", SCAN_AS_ANOTHER_USER, str(data), f"{tmp}/cache/index.npz",
                                 *locked], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode and "Operation not permitted" in result.stderr:
        pytest.skip(f"cannot run as another user here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"counts": [4, 4, 4, 4, 7], "index_files": 1, "rebuilt": True}
    warning = (f"warning: skipped 2 unreadable folder(s) or link(s) under {data}, their images left out: "
               "cat/private (permission denied), dog/locked (permission denied)")
    assert result.stderr.splitlines() == [warning] * 4  # find_images, find_labeled_images, FileIndex built, loaded


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "data path not found"),
    (lambda p: p.mkdir(), "no image files"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "no image files"),
])
def test_missing_or_empty_folders_raise(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        pretrain_dataset(str(root), (64, 64), seed=0)


def test_labeled_folders(tmp_path):
    write_photos(tmp_path / "dog", 3)
    write_photos(tmp_path / "cat", 2)
    files, labels, classes = find_labeled_images(tmp_path)
    assert classes == ["cat", "dog"] and sorted(labels) == [0, 0, 1, 1, 1] and len(files) == 5
    with pytest.raises(DataError, match="no class subfolders"):
        find_labeled_images(tmp_path / "cat" / "nested" / "deeper")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="class folder\\(s\\) without images in .*: empty_class"):
        find_labeled_images(tmp_path)


def test_load_rgb_handles_real_world_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
        "bw.bmp": Image.fromarray(rgb[..., 0] > 128),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (50, 40), name
    sixteen = np.asarray(load_rgb(tmp_path / "sixteen.png"))[..., 0]
    assert np.abs(sixteen.astype(int) - rgb[..., 0]).max() <= 1  # scaled, not clipped to white
    Image.fromarray(np.full((4, 4), 256, dtype=np.uint16)).save(tmp_path / "dark16.png")
    assert np.asarray(load_rgb(tmp_path / "dark16.png")).max() <= 1  # dark stays dark: one scale for 16 bits


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (30, 60)


def test_unreadable_files_are_skipped_and_named_with_their_reason(tmp_path):
    files = write_photos(tmp_path, 4)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(files[0].read_bytes()[:300] if files[0].suffix == ".png" else files[1].read_bytes()[:300])
    order = [files[0], tmp_path / "broken.jpg", files[1], truncated, files[2], files[3]]
    dataset = ImageFiles(order, pretrain_transform((64, 64)))
    items = [dataset[i] for i in range(len(dataset))]  # no warning here: the consuming process prints it
    assert sum(item["skipped"] for item in items) == 2
    assert all(item["image"].shape == (3, 64, 64) for item in items)
    assert items[1]["unreadable"] == {1: f"{tmp_path / 'broken.jpg'}: cannot identify image file "
                                         f"'{tmp_path / 'broken.jpg'}'"}
    assert list(items[3]["unreadable"]) == [3] and items[3]["unreadable"][3].startswith(f"{truncated}: ")
    only_bad = ImageFiles([tmp_path / "broken.jpg"], pretrain_transform((64, 64)))
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        only_bad[0]


def test_unreadable_positions_name_each_bad_file_however_often_it_is_drawn(tmp_path):
    """Issue 22 C: skipped_files counted skip events (43 for 6 bad files); `unreadable` names the files."""
    from accelerate.utils import send_to_device
    from torch.utils.data import DataLoader

    from fcmae.data.gpu_augment import EncodedCrop, collate_encoded

    good = write_photos(tmp_path, 9, size=48)
    bad = []
    for name in ("a.jpg", "b.png", "c.jpg"):
        (tmp_path / name).write_text("not an image")
        bad.append(tmp_path / name)
    files = [good[0], bad[0], bad[1], *good[1:], bad[2]]  # two in a row, and the last (its substitute is the first)
    bad_positions = {1, 2, 11}
    loader = DataLoader(ImageFiles(files, pretrain_transform((32, 32))), batch_size=4, shuffle=True, num_workers=2,
                        collate_fn=CollateUnreadable(), generator=torch.Generator().manual_seed(0))
    events = 0
    for epoch in range(3):
        found = set()
        for batch in loader:
            batch = send_to_device(batch, "cpu")  # what Accelerate does to each batch: the list stays a host list
            assert type(batch["unreadable"]) is dict and all(type(p) is int for p in batch["unreadable"])
            assert all(batch["unreadable"][p] == f"{files[p]}: cannot identify image file '{files[p]}'"
                       for p in batch["unreadable"])  # "PATH: REASON" from the worker, for the main process
            found.update(batch["unreadable"])
            events += int(batch["skipped"].sum())
        assert found == bad_positions, epoch
    assert events == 3 * 4  # per epoch: position 1's item skips 1 and 2, position 2's skips 2 again, 11's skips 11

    encoded = ImageFiles(files, EncodedCrop())  # --gpu-augment's items, through its collate
    batch = CollateUnreadable(collate_encoded)([encoded[i] for i in range(len(files))])
    assert list(batch["unreadable"]) == sorted(bad_positions) and len(batch["image"]["data"]) == len(files)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    files = write_photos(tmp_path, 3)
    dataset = ImageFiles(files, pretrain_transform((64, 96)), seed=5)
    first = dataset[1]["image"]
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(dataset[1]["image"], first) and first.shape == (3, 64, 96)
    assert not torch.equal(dataset[2]["image"], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["image"], first)
    assert not torch.equal(ImageFiles(files, pretrain_transform((64, 96)), seed=6)[1]["image"], first)


def test_eval_transform_center_crops_with_the_crop_ratio():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    assert eval_transform((224, 224))(img).shape == (3, 224, 224)
    assert eval_transform((64, 96))(img).shape == (3, 64, 96)


def test_evaluation_leaves_unreadable_files_out_instead_of_counting_another_twice(tmp_path, capsys):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch import nn
    from torch.utils.data import DataLoader

    from fcmae.evaluation import evaluate

    files = write_photos(tmp_path, 4)
    (tmp_path / "text.jpg").write_text("not an image")
    order = [files[0], tmp_path / "text.jpg", files[1], files[2], files[3]]
    labels = [0, 0, 1, 1, 1]  # the bad file is a class-0 image; substituting the next one would add a class 1
    dataset = ImageFiles(order, pretrain_transform((64, 64)), labels, substitute=False)

    class SaysOne(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)

    loader = DataLoader(dataset, batch_size=2, collate_fn=CollateUnreadable(), num_workers=2)
    try:
        passes = [evaluate(SaysOne(), loader, Accelerator(cpu=True)) for _ in range(3)]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(r["images"] == 4 and r["unreadable"] == 1 and r["acc1"] == 75.0 for r in passes)  # 3 of 4: class 1
    err = capsys.readouterr().err  # the workers met it in each pass; the main process names it once
    assert reported_files(err) == [str(tmp_path / "text.jpg")] and len(err.splitlines()) == 1


def test_fast_transform_is_the_torchvision_pipeline_without_draft(tmp_path):
    """PretrainTransform draws its crop and flip as pretrain_transform does under seeded(), without touching the
    global RNGs: the same pixels to within a few 8-bit levels (torch's antialiased bicubic resize, PIL's filter). With
    draft on, a large JPEG is decoded reduced and stays close."""
    from fcmae.data import PretrainTransform, seeded
    from fcmae.data.decoding import open_image

    photo = load_rgb(write_photos(tmp_path, 1, size=400)[0])
    small, large = tmp_path / "small.jpg", tmp_path / "large.jpg"
    photo.resize((120, 90)).save(small, quality=95)
    photo.resize((800, 800)).save(large, quality=95)
    exact, drafted = PretrainTransform((64, 64), draft=False), PretrainTransform((64, 64))
    reference = pretrain_transform((64, 64))
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    diffs = []
    for path in (small, large):
        for index in range(6):
            seeded([3, 1, index])
            expected = reference(load_rgb(path))
            state = torch.get_rng_state()
            out = exact(open_image(path), [3, 1, index])
            levels = ((out - expected) * std * 255).abs()  # in 8-bit levels: a flip or another crop is far more
            assert levels.max() < 6.01 and levels.mean() < 0.3, (levels.max(), levels.mean())
            assert torch.equal(torch.get_rng_state(), state)
            diffs.append((drafted(open_image(path), [3, 1, index]) - out).abs().mean().item())
    assert diffs[:6] == [0.0] * 6  # 120x90: every crop is too small to decode reduced
    assert 0 < max(diffs[6:]) < 0.05, diffs  # of a value range of about 4.5 (normalized)


def test_jpegs_decode_to_pils_pixels_straight_into_arrays(tmp_path):
    """decode_jpeg_rgb (libjpeg-turbo via simplejpeg) gives PIL's pixels bit for bit: RGB with 4:2:0 and 4:4:4
    chroma, progressive, grayscale (as RGB), and reduced 1/2, 1/4, 1/8 as PIL's draft; files it cannot take (PNG,
    CMYK, EXIF-rotated) are left to PIL."""
    from fcmae.data.decoding import decode_jpeg_rgb, open_image, to_rgb

    photo = load_rgb(write_photos(tmp_path, 1, size=400)[0]).resize((413, 301))  # sizes not divisible by 8
    cases = {"420.jpg": dict(quality=90), "444.jpg": dict(quality=95, subsampling=0),
             "progressive.jpg": dict(quality=85, progressive=True)}
    for name, options in cases.items():
        photo.save(tmp_path / name, **options)
    photo.convert("L").save(tmp_path / "gray.jpg", quality=90)
    for name in (*cases, "gray.jpg"):
        expected = np.asarray(load_rgb(tmp_path / name))
        assert np.array_equal(decode_jpeg_rgb(open_image(tmp_path / name)), expected), name
        for k in (2, 4, 8):
            reference = open_image(tmp_path / name)
            reference.draft(reference.mode, (413 // k, 301 // k))
            reduced = decode_jpeg_rgb(open_image(tmp_path / name), (413 // k, 301 // k))
            assert reduced.shape[:2] == (-(-301 // k), -(-413 // k)), (name, k)  # libjpeg rounds up
            assert np.array_equal(reduced, np.asarray(to_rgb(reference))), (name, k)
            reference.close()
    photo.save(tmp_path / "photo.png")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("photo.png", "cmyk.jpg", "rotated.jpg"):
        with open_image(tmp_path / name) as img:
            assert decode_jpeg_rgb(img) is None, name
    # A truncated JPEG fails in this decoder as in PIL's: the sample is skipped with a warning.
    from fcmae.data import PretrainTransform

    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "420.jpg").read_bytes()[:3000])
    dataset = ImageFiles([tmp_path / "truncated.jpg", tmp_path / "420.jpg"], PretrainTransform((64, 64)))
    item = dataset[0]
    assert item["skipped"] == 1 and item["unreadable"][0].startswith(f"{tmp_path / 'truncated.jpg'}: ")


def test_exif_rotation_is_applied_by_the_fast_transform_too(tmp_path):
    from fcmae.data import PretrainTransform
    from fcmae.data.decoding import open_image

    pixels = np.zeros((600, 300, 3), dtype=np.uint8)
    pixels[:, :150] = 255  # left half white: after a 90-degree turn, the top half is
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    transform = PretrainTransform((64, 64), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=(1.0, 1.0),
                                  ratio=(0.5, 0.5))
    for draft in (False, True):
        transform.draft = draft
        out = transform(open_image(tmp_path / "rotated.jpg"), [0, 0, 0])
        assert out[:, :24].mean() > 0.9 and out[:, 40:].mean() < 0.1, draft


def test_folder_index_is_cached_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    from fcmae.data import FileIndex
    from fcmae.data import file_index

    write_photos(tmp_path / "data", 6)
    walks = []
    monkeypatch.setattr(file_index, "walk_images", lambda root: walks.append(root) or walk_images(root))
    first = FileIndex.load(tmp_path / "data")
    assert [first[i] for i in range(len(first))] == find_images(tmp_path / "data") and len(walks) == 1
    again = FileIndex.load(tmp_path / "data")
    assert len(walks) == 1 and np.array_equal(again.blob, first.blob)  # from the cache
    write_photos(tmp_path / "data" / "nested" / "deeper" / "new", 1)  # a new folder two levels down
    assert len(FileIndex.load(tmp_path / "data")) == 7 and len(walks) == 2
    (tmp_path / "data" / "photo_001.jpg").unlink()
    assert len(FileIndex.load(tmp_path / "data")) == 6 and len(walks) == 3
    assert FileIndex.load(tmp_path / "data")[-1] == find_images(tmp_path / "data")[-1] and len(walks) == 3
    (tmp_path / "link").symlink_to(tmp_path / "data")  # another name for the same folder: the same cache entry
    assert len(FileIndex.load(tmp_path / "link")) == 6 and len(walks) == 3
    import pickle

    assert len(pickle.dumps(first)) < 2000  # what a DataLoader worker receives: two small arrays


@pytest.mark.parametrize("channels, dtype, suffix", [
    (1, np.uint16, ".png"), (1, np.uint16, ".tif"), (4, np.uint16, ".tif"), (13, np.float32, ".npy"),
    (3, np.uint8, ".tif"),
])
def test_multichannel_and_16_bit_images(tmp_path, channels, dtype, suffix):
    import tifffile

    from fcmae.data import PretrainTransform, load_array

    rng = np.random.default_rng(0)
    peak = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    pixels = (rng.random((50, 70, channels)) * peak).astype(dtype)
    path = tmp_path / f"image{suffix}"
    if suffix == ".png":
        Image.fromarray(pixels[..., 0]).save(path)
    elif suffix == ".tif":
        planar = channels == 4  # stored (C, H, W), as microscopy stacks often are
        tifffile.imwrite(path, np.moveaxis(pixels, -1, 0) if planar else pixels, photometric="minisblack")
    else:
        np.save(path, pixels)
    loaded = load_array(path)
    assert loaded.shape == (50, 70, channels) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, pixels / np.float32(peak), rtol=1e-6)
    mean, std = [0.5] * channels, [0.25] * channels
    dataset = ImageFiles([path, path], PretrainTransform((32, 48), mean, std), seed=0)
    image = dataset[1]["image"]
    assert image.shape == (channels, 32, 48) and dataset[1]["skipped"] == 0
    assert abs(image.mean().item()) < 0.5  # normalized: values near 0.5 +- 0.29 became about 0 +- 1.2
    wrong = ImageFiles([path, path], PretrainTransform((32, 48), [0.5] * (channels + 1), [0.25] * (channels + 1)))
    with pytest.raises(DataError, match=f"image has {channels} channels, the data config expects {channels + 1}"):
        wrong[0]  # at once: a config mistake, not a damaged file to skip
    if channels == 1:  # grayscale data in an RGB run is made RGB, as PIL's convert does for photos
        assert ImageFiles([path], PretrainTransform((32, 48)))[0]["image"].shape == (3, 32, 48)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="nvjpeg needs a CUDA GPU"))])
def test_gpu_augment_makes_the_crops_and_flips_of_the_cpu_path(tmp_path, device):
    """--gpu-augment's device half, run on the CPU here (decode_jpeg works there too) and on CUDA with nvjpeg."""
    import tifffile
    from torch.utils.data import DataLoader

    from fcmae.data import PretrainTransform
    from fcmae.data.gpu_augment import DeviceAugment, EncodedCrop, collate_encoded

    files = write_photos(tmp_path, 6, size=128)  # JPEGs and PNGs
    exif = Image.Exif()
    exif[0x0112] = 6
    load_rgb(files[0]).save(tmp_path / "rotated.jpg", exif=exif, quality=95)  # EXIF-rotated: decoded by PIL
    tifffile.imwrite(tmp_path / "deep.tif", (np.asarray(load_rgb(files[1])).astype(np.uint16) * 257))  # 16-bit RGB
    files += [tmp_path / "rotated.jpg", tmp_path / "deep.tif"]
    encoded = ImageFiles(files, EncodedCrop(), seed=4)
    batch = next(iter(DataLoader(encoded, batch_size=len(files), collate_fn=collate_encoded)))
    assert [d.dim() for d in batch["image"]["data"]] == [3, 1, 3, 1, 3, 1, 3, 3]  # JPEG bytes travel encoded
    out = DeviceAugment(device, (64, 64))(batch["image"])
    assert out.shape == (8, 3, 64, 64) and out.device.type == device
    reference = torch.stack([ImageFiles(files, PretrainTransform((64, 64), draft=False), seed=4)[i]["image"]
                             for i in range(len(files))])
    level = 1 / (255 * 0.225)  # one 8-bit level, normalized
    per_image = (out.cpu() - reference).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 4 * level, per_image / level  # a flip or another crop would differ by far more


def test_channel_stats_of_a_sample(tmp_path, capsys):
    import tifffile

    from fcmae.cli.stats import main
    from fcmae.data.stats import channel_stats

    rng = np.random.default_rng(0)
    stack = []
    for i in range(5):
        pixels = np.stack([rng.normal(loc, 300, (40, 30)) for loc in (1000, 20000, 40000, 60000)], -1)
        stack.append(pixels.clip(0, 65535).astype(np.uint16))
        tifffile.imwrite(tmp_path / f"cell_{i}.tif", stack[-1])
    expected = np.stack(stack).reshape(-1, 4) / 65535
    mean, std, count, unreadable = channel_stats(str(tmp_path), in_chans=4, samples=100)
    assert count == 5 and unreadable == {}
    np.testing.assert_allclose(mean, expected.mean(0), rtol=1e-6)  # float32 pixels
    np.testing.assert_allclose(std, expected.std(0), rtol=1e-6)
    assert main([str(tmp_path), "--in-chans", "3"]) == 2
    assert "has 4 channels, not --in-chans 3" in capsys.readouterr().err
    assert main(["demo", "--samples", "3"]) == 0
    assert "# 3 images of demo\nmean: [0." in capsys.readouterr().out


def reported_files(stderr: str) -> list[str]:
    """The paths named by `warning: skipped unreadable image PATH: REASON` lines (each with a reason), in order."""
    import re

    return re.findall(r"^warning: skipped unreadable image (\S+): \S.*$", stderr, re.MULTILINE)


def damaged_copies(files: list[Path], folder: Path) -> list[Path]:
    """Real damaged files made from real photos: a JPEG and a PNG cut in half, a PNG with its header zeroed."""
    jpg = next(f for f in files if f.suffix == ".jpg").read_bytes()
    png = next(f for f in files if f.suffix == ".png").read_bytes()
    damaged = {"cut.jpg": jpg[: len(jpg) // 2], "cut.png": png[: len(png) // 2],
               "garbled.png": png[:8] + bytes(300) + png[308:]}
    for name, data in damaged.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in damaged]


def test_channel_stats_skip_warn_and_count_unreadable_files(tmp_path, capsys):
    """Issue 24 item 9: fcmae-stats stopped at the first unreadable file; it skips, warns once per file and counts
    them as training does, and the statistics are those of the readable images."""
    from fcmae.cli.stats import main
    from fcmae.data.stats import channel_stats

    files = write_photos(tmp_path, 6, size=64)
    bad = damaged_copies(files, tmp_path)
    pixels = np.concatenate([np.asarray(load_rgb(f), dtype=np.float64).reshape(-1, 3) / 255 for f in files])
    assert main([str(tmp_path), "--samples", "100"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"# 6 images of {tmp_path} (3 unreadable skipped)\nmean: [")
    assert sorted(reported_files(err)) == sorted(map(str, bad)) and len(err.splitlines()) == 3
    mean, std, count, unreadable = channel_stats(str(tmp_path), samples=100)
    assert count == 6 and sorted(Path(text.split(": ")[0]) for text in unreadable.values()) == sorted(bad)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)
    mean4, _, count4, unreadable4 = channel_stats(str(tmp_path), samples=4)  # a bad draw is replaced by the next
    assert count4 == 4 and len(unreadable4) <= 3
    capsys.readouterr()
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    damaged_copies(files, only_bad)
    assert main([str(only_bad)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: none of the 3 images")
