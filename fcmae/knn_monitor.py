"""The kNN monitor: do the encoder's features improve while pretraining runs? (`pretrain.py --monitor-data DIR`)

The reconstruction loss says how well removed patches are painted, not whether the features separate anything.
Every `--monitor-every` steps the monitor takes a labeled ImageFolder (DIR/train/<class>/..., DIR/val/<class>/...),
computes the encoder's features of all its images, and classifies each val image by its 20 nearest train images.

The protocol is `benchmarks/probe.py`'s kNN, which imports `knn_accuracy` from here:
- features: global average pool of the last stage, every patch visible: what timm's converted model gives as
  `forward_features(x).mean((2, 3))` (`pooled_features`);
- images: the shorter side resized to the input size (bicubic), center crop, the run's normalization (probe.py's
  `eval_transform(size, crop_pct=1.0)`);
- standardized with the train features' mean and std, cosine similarity, k = min(20, train images), majority vote
  with ties to the lowest class index (scikit-learn's StandardScaler and KNeighborsClassifier, in float64).

With several processes each computes the features of its share of the images (images i, i + world, ...) and
gathers the rest, so every process spends the same time in it (the watchdog's slow phase) and none waits in a
training collective for another; the vote is then computed on every process alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms as T

from .data import CollateUnreadable, DataError, EvalTransform, ImageFiles, find_labeled_images
from .data.datasets import ARRAY_SUFFIXES
from .encoder import SparseConvNeXtV2

__all__ = ["KNNMonitor", "knn_accuracy", "pooled_features", "K"]

K = 20  # neighbours, as benchmarks/probe.py and the kNN evaluations of DINO / MAE-style papers use


def knn_accuracy(train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, k: int = K) -> float:
    """Top-1 accuracy (%) on val of a k-nearest-neighbour vote among the train features.

    Args:
        train: (N, C) features, train_labels: (N,) class indices; val: (M, C), val_labels: (M,).
        k: neighbours (at most N are used).

    Standardized with train's mean and population std (a constant feature keeps scale 1), as scikit-learn's
    StandardScaler; cosine similarity; each val sample takes the most frequent label among its k most similar
    train samples, ties going to the lowest label, as KNeighborsClassifier(metric="cosine") predicts. In float64.
    """
    train, val = torch.as_tensor(train).double(), torch.as_tensor(val).double()
    train_labels, val_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(val_labels).long()
    mean, std = train.mean(0), train.std(0, correction=0)
    std = torch.where(std < 10 * torch.finfo(std.dtype).eps, torch.ones_like(std), std)  # StandardScaler's rule
    train = torch.nn.functional.normalize((train - mean) / std, dim=1)
    val = torch.nn.functional.normalize((val - mean) / std, dim=1)
    k = min(k, len(train))
    classes = int(max(train_labels.max(), val_labels.max())) + 1
    correct = 0
    for rows, labels in zip(val.split(1024), val_labels.split(1024)):  # (1024, N) similarities at a time
        nearest = (rows @ train.T).topk(k, dim=1).indices
        votes = torch.zeros(len(rows), classes, dtype=torch.long).scatter_add_(
            1, train_labels[nearest], torch.ones_like(nearest))
        correct += int((votes.argmax(1) == labels).sum())  # argmax: the first of equal counts, the lowest label
    return 100.0 * correct / len(val_labels)


@torch.no_grad()
def pooled_features(encoder: SparseConvNeXtV2, images: Tensor) -> Tensor:
    """(N, in_chans, H, W) normalized images -> (N, C_last) float32: the last stage's map with every patch visible,
    averaged over its positions. The dense path (whatever the training backend), in float32 outside autocast."""
    grid = encoder.check_input(images)
    with torch.autocast(images.device.type, enabled=False):
        keep_all = images.new_zeros(images.shape[0], grid[0] * grid[1])
        return encoder.forward_dense(images.float(), keep_all, grid).float().mean((2, 3))


class KNNMonitor:
    """The monitor's images (this process's share, decoded once and kept in memory) and their evaluation.

    Args:
        root: DIR holding train/ and val/, the same class subfolders in each (at least 2 classes).
        size: (H, W) of the crops: the run's input size.
        mean, std: the run's per-channel normalization (None: ImageNet's).
        in_chans: the model's channels; other than 3 (or .npy / TIFF files) reads arrays, as finetune.py does.
        rank, world: this process and the number of processes; it keeps the images rank, rank + world, ...
        batch_size: images per forward pass.
        num_workers: decoding processes for the one-time load.

    Raises DataError (one line) for a missing folder, a missing split, fewer than 2 classes or splits whose class
    folders differ. Photos are kept as 8-bit crops (3 bytes a pixel), arrays as float32.
    """

    def __init__(self, root: str | Path, size: tuple[int, int], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, in_chans: int = 3, rank: int = 0, world: int = 1,
                 batch_size: int = 64, num_workers: int = 0):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"--monitor-data {root} is not a folder; it takes a labeled ImageFolder with train/ and "
                            f"val/ subfolders, one folder per class in each")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"--monitor-data {root} has no {split}/ folder; expected {root}/train/<class>/... "
                                f"and {root}/val/<class>/...")
        files, labels, classes = find_labeled_images(root / "train")
        if len(classes) < 2:
            raise DataError(f"--monitor-data {root / 'train'} has {len(classes)} class folder; a kNN accuracy needs "
                            "at least 2")
        val_files, val_labels, val_classes = find_labeled_images(root / "val")
        if val_classes != classes:
            differing = sorted(set(val_classes) ^ set(classes))
            raise DataError(f"--monitor-data: train/ and val/ have different class folders (differing: "
                            f"{', '.join(differing[:8])})")
        self.root, self.classes, self.batch_size = root, classes, batch_size
        self.num_train = len(files)
        self.labels = torch.tensor(labels + val_labels)
        self.rank, self.world = rank, world
        mean, std = list(mean or IMAGENET_DEFAULT_MEAN), list(std or IMAGENET_DEFAULT_STD)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        all_files = files + val_files
        self.arrays = in_chans != 3 or any(Path(f).suffix.lower() in ARRAY_SUFFIXES for f in all_files)
        if self.arrays:  # resize, crop and normalize in torch, as finetune.py's evaluation of array data
            transform = EvalTransform(size, mean, std, crop_pct=1.0)
        else:  # probe.py's eval_transform(size, crop_pct=1.0) without ToTensor and Normalize: 8-bit pixels
            transform = T.Compose([T.Resize(max(size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                   T.PILToTensor()])
        mine = all_files[rank::world]
        dataset = ImageFiles(mine, transform, self.labels[rank::world].tolist(), substitute=False)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=CollateUnreadable())
        batches = list(loader)
        self.images = torch.cat([b["image"] for b in batches]) if batches else torch.empty(0)
        self.readable = torch.cat([b["readable"] for b in batches]) if batches else torch.empty(0, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return (f"kNN monitor: {self.num_train} train / {len(self) - self.num_train} val images of {len(self.classes)} "
                f"classes in {self.root}")

    def normalized(self, images: Tensor) -> Tensor:
        """A batch of kept images, on its device, as the model takes them: what ToTensor + Normalize give."""
        if self.arrays:
            return images  # normalized by EvalTransform
        return images.float().div(255).sub_(self.mean.to(images.device)).div_(self.std.to(images.device))

    def features(self, encoder: SparseConvNeXtV2, accelerator: Accelerator) -> tuple[Tensor, Tensor]:
        """(features (N, C) float32, readable (N,) bool) of every monitor image, in file order, on every process."""
        device = accelerator.device
        out = [pooled_features(encoder, self.normalized(batch.to(device, non_blocking=True)))
               for batch in self.images.split(self.batch_size)]
        feats = torch.cat(out) if out else torch.empty(0, encoder.num_features, device=device)
        if self.world > 1:  # one gather of [features, readable] padded to the largest share; image i back at row i
            share = -(-len(self) // self.world)
            rows = torch.cat([feats, self.readable.to(device, feats.dtype)[:, None]], dim=1)
            rows = torch.cat([rows, rows.new_zeros(share - len(rows), rows.shape[1])])
            rows = accelerator.gather(rows).view(self.world, share, -1).transpose(0, 1).reshape(-1, rows.shape[1])
            rows = rows[:len(self)].cpu()
            return rows[:, :-1], rows[:, -1] > 0
        return feats.cpu(), self.readable.clone()

    def evaluate(self, encoder: SparseConvNeXtV2, accelerator: Accelerator) -> dict[str, float]:
        """{"knn_top1": val accuracy in %, "knn_seconds": wall time of this evaluation}; the same on every process.
        Unreadable files (named in a warning when loaded) are left out of both sides."""
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            feats, readable = self.features(encoder, accelerator)
        finally:
            encoder.train(was_training)
        train = readable.clone()
        train[self.num_train:] = False
        val = readable.clone()
        val[:self.num_train] = False
        if not train.any() or not val.any():
            raise DataError(f"--monitor-data {self.root}: no readable image in train/ or in val/")
        top1 = knn_accuracy(feats[train], self.labels[train], feats[val], self.labels[val])
        return {"knn_top1": top1, "knn_seconds": round(time.perf_counter() - start, 3)}
