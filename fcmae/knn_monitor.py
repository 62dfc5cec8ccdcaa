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

With several processes each decodes (once, at start) and computes the features of its share of the images
(images i, i + world, ...) and gathers the rest, so every process spends the same time in it (the watchdog's
slow phase after a step) and none waits in a training collective for another; the vote is then computed on every
process alike. Bad input ends the run before training with one line: a missing folder or split, no class folders,
fewer than 2 classes, splits with different classes, an unreadable image.

The monitor reads the weights and nothing else: no global RNG is drawn (loading has its own generator, the
features are deterministic), the encoder is back in training mode after it, and the training steps are reseeded
every step anyway, so a run's losses and weights, and its exact resume, are the same with the monitor as without.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
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
        num_workers: decoding processes for the one-time load.

    Raises DataError (one line) for a missing folder, a missing split or class folders, fewer than 2 classes or
    splits whose class folders differ. Files of this share that cannot be read are listed in `unreadable`
    ("PATH: REASON"); `start` refuses them, since the kNN of a subset would not be probe.py's number. Photos are
    kept as 8-bit crops (3 bytes a pixel), arrays as float32. Loading draws nothing from the global RNGs, so a run's initialization and its
    training are the same with the monitor as without.
    """

    def __init__(self, root: str | Path, size: tuple[int, int], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, in_chans: int = 3, rank: int = 0, world: int = 1,
                 num_workers: int = 0):
        self.root = root = Path(root).expanduser()
        files, labels, val_files, val_labels, self.classes = labeled_splits(root)
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
        # Its own generator: iterating a DataLoader draws a seed from the one it is given (the global RNG by
        # default), which would shift the model's initialization after it.
        loader = DataLoader(dataset, batch_size=LOAD_BATCH, num_workers=num_workers,
                            collate_fn=CollateUnreadable(), generator=torch.Generator())
        batches = list(loader)
        self.images = torch.cat([b["image"] for b in batches]) if batches else torch.empty(0)
        self.unreadable = [text for b in batches for text in b["unreadable"].values()]  # "PATH: REASON" each

    @classmethod
    def start(cls, accelerator: Accelerator, root: str | Path, size: tuple[int, int],
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None, in_chans: int = 3,
              num_workers: int = 0) -> KNNMonitor:
        """pretrain.py's monitor, before training: its folders checked by the main process first (a bad one: the
        same one-line error on every process, none left waiting), then every process decodes its share at once;
        an unreadable image in any share ends every process with the same line."""
        from .training.run import main_process_first  # fcmae.training does not import the monitor

        main_process_first(accelerator, lambda: labeled_splits(root), others=False)
        monitor = cls(root, size, mean, std, in_chans, accelerator.process_index, accelerator.num_processes,
                      num_workers)
        unreadable = monitor.unreadable
        if accelerator.num_processes > 1:
            unreadable = [text for share in gather_object([unreadable]) for text in share]  # in rank order
        if unreadable:
            raise DataError(f"--monitor-data {monitor.root}: {len(unreadable)} unreadable image(s), first "
                            f"{unreadable[0]}; fix or remove them (the kNN counts every image, as "
                            "benchmarks/probe.py does)")
        return monitor

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

    def features(self, encoder: SparseConvNeXtV2, accelerator: Accelerator, batch_size: int = 64) -> Tensor:
        """(N, C) float32 features of every monitor image, in file order, on every process (on the host)."""
        device = accelerator.device
        out = [pooled_features(encoder, self.normalized(batch.to(device, non_blocking=True)))
               for batch in self.images.split(batch_size) if len(batch)]  # a share may be empty
        feats = torch.cat(out) if out else torch.empty(0, encoder.num_features, device=device)
        if self.world > 1:  # one gather of the features padded to the largest share; image i back at row i
            share = -(-len(self) // self.world)
            feats = torch.cat([feats, feats.new_zeros(share - len(feats), feats.shape[1])])
            feats = accelerator.gather(feats).view(self.world, share, -1).transpose(0, 1).reshape(-1, feats.shape[1])
        return feats[:len(self)].cpu()

    def evaluate(self, encoder: SparseConvNeXtV2, accelerator: Accelerator, batch_size: int = 64) -> dict[str, float]:
        """{"knn_top1": val accuracy in %, "knn_seconds": wall time of this evaluation}; the same on every process.
        A collective with several processes: every process calls it at the same step."""
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            feats = self.features(encoder, accelerator, batch_size)
        finally:
            encoder.train(was_training)
        n = self.num_train
        top1 = knn_accuracy(feats[:n], self.labels[:n], feats[n:], self.labels[n:])
        return {"knn_top1": top1, "knn_seconds": round(time.perf_counter() - start, 3)}


LOAD_BATCH = 64  # images a decoding batch: the load's only use of a batch size


def labeled_splits(root: Path | str) -> tuple[list[Path], list[int], list[Path], list[int], list[str]]:
    """(train files, labels, val files, labels, classes) of DIR/train and DIR/val; DataError (one line naming
    the problem and the layout expected) for a missing folder or split, fewer than 2 classes, or splits whose
    class folders differ."""
    root = Path(root).expanduser()
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not root.is_dir():
        raise DataError(f"--monitor-data {root} is not a folder; it takes a labeled ImageFolder with train/ and "
                        f"val/ subfolders, one folder per class in each")
    found = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"--monitor-data {root} has no {split}/ folder; {layout}")
        try:
            found[split] = find_labeled_images(root / split)
        except DataError as e:  # no class folders (no labels), or a class folder without images
            raise DataError(f"--monitor-data: {e}; {layout}") from None
    (files, labels, classes), (val_files, val_labels, val_classes) = found["train"], found["val"]
    if len(classes) < 2:
        raise DataError(f"--monitor-data {root / 'train'} has {len(classes)} class folder; a kNN accuracy needs "
                        "at least 2")
    if val_classes != classes:
        differing = sorted(set(val_classes) ^ set(classes))
        raise DataError(f"--monitor-data: train/ and val/ have different class folders (differing: "
                        f"{', '.join(differing[:8])})")
    return files, labels, val_files, val_labels, classes

