"""Image folders, real-world image formats, unreadable files and seeded augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data import (
    DataError, ImageFiles, eval_transform, find_images, find_labeled_images, load_rgb, pretrain_dataset,
    pretrain_transform,
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


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    files = write_photos(tmp_path, 4)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(files[0].read_bytes()[:300] if files[0].suffix == ".png" else files[1].read_bytes()[:300])
    order = [files[0], tmp_path / "broken.jpg", files[1], truncated, files[2], files[3]]
    dataset = ImageFiles(order, pretrain_transform((64, 64)))
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(item["skipped"] for item in items) == 2
    assert all(item["image"].shape == (3, 64, 64) for item in items)
    only_bad = ImageFiles([tmp_path / "broken.jpg"], pretrain_transform((64, 64)))
    with pytest.raises(DataError, match="none of the 1 images could be read"), pytest.warns(UserWarning):
        only_bad[0]


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


def test_evaluation_leaves_unreadable_files_out_instead_of_counting_another_twice(tmp_path):
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

    with pytest.warns(UserWarning, match="skipping unreadable image .*text.jpg"):
        result = evaluate(SaysOne(), DataLoader(dataset, batch_size=2), Accelerator(cpu=True))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert result["images"] == 4 and result["acc1"] == 75.0  # 3 of the 4 readable images are class 1
