"""Fine-tune (or linearly probe) a dense timm ConvNeXt V2 on an ImageFolder dataset, with the paper's recipe.

    accelerate launch finetune.py --config configs/finetune/convnextv2_base.yaml --data-path /data/imagenet \
        --finetune output/pretrain/fcmae_model.safetensors
    accelerate launch finetune.py --eval --resume output/finetune/classifier.safetensors --data-path /data/imagenet
    python finetune.py                                   # the demo: digits, from the pretrain demo's weights
    python finetune.py --config configs/finetune/demo.yaml --epochs 2   # the demo, with overrides

Config -> data -> timm ConvNeXt V2 (+ recipe) -> the shared Accelerate loop (fcmae.training) + evaluation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from fcmae.cli import check_command_line, run_cli
from fcmae.config import ConfigError, FinetuneConfig, load_yaml, parse_config
from fcmae.config.training_configs import canonical, flat_settings, from_canonical, merge

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune" / "demo.yaml"
if __name__ == "__main__":  # --help and a bad flag are answered here, before torch and timm import (seconds)
    check_command_line(FinetuneConfig, description=__doc__, demo=DEMO_CONFIG)

import timm
import torch
from accelerate import Accelerator
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars, create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from fcmae.checkpoints import load, load_state_dict_strict, names, write_safetensors
from fcmae.data import (
    CollateUnreadable, DataError, EvalTransform, ImageFiles, PretrainTransform, find_labeled_images, resolve_data_path,
)
from fcmae.data.datasets import ARRAY_SUFFIXES
from fcmae.evaluation import evaluate
from fcmae.layer_decay import param_groups_layer_decay
from fcmae.linear_probe import attach_probe, fold_probe
from fcmae.training import Run, fit, main_process_first, processes_without_gpu, quiet_worker
from fcmae.training.invocation import invocation, script_command

PRETRAIN_DEMO = "configs/pretrain/digits.yaml"  # the pretraining the demo's --finetune file comes from
# what --eval takes from the model it evaluates (explicit flags override): its input geometry and its channels
EVAL_SETTINGS = ("input_size", "crop_pct", "interpolation", "in_chans", "mean", "std")


# Data -----------------------------------------------------------------------------------------------------------


def datasets(config: FinetuneConfig) -> tuple[ImageFiles, ImageFiles, list[str]]:
    """train/ and val/ ImageFolders with the recipe's transforms; checks the class folders agree."""
    root = resolve_data_path(config.data_path)
    if not root.is_dir():
        raise DataError(f"data path not found or not a folder: {root}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder; expected {root}/train/<class>/... and "
                            f"{root}/val/<class>/...")
    train_files, train_labels, classes = find_labeled_images(root / "train")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has {len(classes)} class folder; classification needs at least 2")
    val_files, val_labels, val_classes = find_labeled_images(root / "val")
    if val_classes != classes:
        extra = sorted(set(val_classes) ^ set(classes))
        raise DataError(f"train/ and val/ have different class folders (differing: {', '.join(extra[:8])})")
    if config.model.num_classes and config.model.num_classes != len(classes):
        raise DataError(f"--num-classes {config.model.num_classes} does not match the {len(classes)} class folders "
                        f"in {root / 'train'}")
    files = [*train_files, *val_files]
    if config.model.in_chans != 3 or any(Path(f).suffix.lower() in ARRAY_SUFFIXES for f in files):
        # arrays (any channel count, 16-bit, .npy): crop, flip and resize in torch (see the README, Data)
        mean, std = config.normalization()
        mean, std = mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
        train_tf = PretrainTransform(config.img_size, mean, std, draft=False, scale=(0.08, 1.0))  # timm's scale
        val_tf = EvalTransform(config.img_size, mean, std, config.crop_pct)
    else:
        train_tf = create_transform(  # config.aa and config.interpolation were checked when the config was read
            config.img_size, is_training=True, auto_augment=config.aa or None, interpolation=config.interpolation,
            color_jitter=config.color_jitter, re_prob=config.reprob, re_mode="pixel", re_count=1,
            **normalization_kwargs(config),
        )  # fmt: skip
        for op in _augment_ops(train_tf):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
        val_tf = eval_transform(config)
    return (ImageFiles(train_files, train_tf, train_labels, seed=config.seed),
            ImageFiles(val_files, val_tf, val_labels, substitute=False), classes)


def normalization_kwargs(config: FinetuneConfig) -> dict:
    """timm's create_transform mean / std: the config's, if given, else timm's ImageNet defaults."""
    mean, std = config.normalization()
    return {} if mean is None else {"mean": tuple(mean), "std": tuple(std)}


def _augment_ops(transform) -> list[auto_augment.AugmentOp]:
    """The ops of the RandAugment / AutoAugment / AugMix policies inside a timm transform."""
    ops = []
    for t in getattr(transform, "transforms", []):
        ops += getattr(t, "ops", None) or [op for sub_policy in getattr(t, "policy", []) for op in sub_policy]
    return ops


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as in Pillow < 13.

    Pillow 13 refuses 0 bits, and timm's PosterizeIncreasing asks for 0 at magnitude 10, which the recipe's
    rand-m9-mstd0.5 draws every few batches.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def eval_transform(config: FinetuneConfig):
    """Resize to input_size / crop_pct, then center crop (crop_pct 0.875: 256 -> 224, the same ratio elsewhere)."""
    return create_transform(config.img_size, is_training=False, interpolation=config.interpolation,
                            crop_pct=config.crop_pct, **normalization_kwargs(config))


# Model ----------------------------------------------------------------------------------------------------------


def build_model(config: FinetuneConfig, num_classes: int, say=print) -> nn.Module:
    """timm's ConvNeXt V2 with a fresh classifier, its encoder from config.finetune if given (any input
    `fcmae.load` reads); `say` gets the converter's notes (what was detected, dropped or inferred)."""
    drop_path = 0.0 if config.linear_probe else config.model.drop_path
    model = timm.create_model(config.model.name, num_classes=num_classes, drop_path_rate=drop_path,
                              head_init_scale=config.model.head_init_scale, in_chans=config.model.in_chans)
    if config.finetune:
        from fcmae.convert import convert

        result = convert(config.finetune, "timm", model=config.model.name, drop_head=True)
        for note in result.notes:
            say(f"--finetune: {note}")
        missing, unexpected = model.load_state_dict(result.state, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"{config.finetune} does not fit {config.model.name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if config.linear_probe:
        attach_probe(model)
    return model


def load_for_eval(config: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """The model named by --resume: finetune.py's classifier file, its run folder or a training-state folder, or
    any other timm-layout weights `fcmae.load` reads."""
    loaded = load(config.resume)
    state, metadata, file = loaded.state, loaded.metadata, loaded.file
    if loaded.layout == "fcmae":
        raise ConfigError(f"{file} is an FCMAE pretraining model, not a classifier: fine-tune it with "
                          f"--finetune {config.resume}, then evaluate the result")
    if loaded.layout != "timm":
        raise ConfigError(f"{file} holds {loaded.layout} weights; convert them first: fcmae-convert {file} "
                          "classifier.safetensors --to timm")
    if metadata.get("model", config.model.name) != config.model.name:
        raise ConfigError(f"{file} holds a {metadata['model']}; pass --model {metadata['model']}")
    model = timm.create_model(config.model.name, num_classes=num_classes, in_chans=config.model.in_chans)
    if "head.fc.0.running_mean" in state:  # a linear probe's training checkpoint
        state = fold_probe(state)
    load_state_dict_strict(model, state, source=f"{file} (for {config.model.name} with {num_classes} classes)")
    return model, metadata


def optimizer_for(model: nn.Module, config: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """config.optimizer on the trainable parameters, with layer decay (the official layer ids) unless off.

    Biases and 1-D parameters (norms, GRN gamma / beta) get no weight decay (official issue #15). LARS is MAE's:
    the trust ratio (coefficient 0.001) scales the update of every weight matrix, even without weight decay, and
    never of biases and other 1-D parameters; momentum 0.9.
    """
    depths = [len(stage.blocks) for stage in model.stages]
    groups = param_groups_layer_decay(model, depths, config.weight_decay, config.layer_decay, config.layer_decay_type)
    if config.optimizer == "lars":
        for group in groups:
            group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
        return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    return create_optimizer_v2(groups, config.optimizer, lr=lr, weight_decay=config.weight_decay, momentum=0.9)


# Main -----------------------------------------------------------------------------------------------------------


def saved_eval_settings(resume: str) -> dict:
    """The EVAL_SETTINGS the model named by --resume was evaluated with when it was saved: from the model file's
    metadata, the ones it lacks (files written before they were recorded) from the config.yaml of its run or
    checkpoint folder ({} if neither has them)."""
    try:
        loaded = load(resume)
    except (OSError, ValueError):
        return {}  # load_for_eval reports it
    settings = {key: json.loads(loaded.metadata[key]) for key in EVAL_SETTINGS if key in loaded.metadata}
    if len(settings) == len(EVAL_SETTINGS):
        return settings
    saved = loaded.run_config
    if saved is None and (loaded.file.parent / names.RUN_CONFIG).is_file():
        saved = load_yaml(loaded.file.parent / names.RUN_CONFIG)
    saved = flat_settings(saved or {})  # in_chans is in the model: section of a run's config.yaml
    return {**{key: saved[key] for key in EVAL_SETTINGS if key in saved}, **settings}


EVAL_AUTO_BATCH = 64  # --eval with --batch-size auto


def evaluate_only(config: FinetuneConfig) -> dict:
    """Accuracy of the weights named by --resume on val/; prints it and writes nothing.

    Input size, crop pct, interpolation, channels and normalization are the ones the model was saved with, unless
    given as flags.
    """
    saved = {k: v for k, v in saved_eval_settings(config.resume).items() if k not in config.explicit}
    if saved:
        config = from_canonical(FinetuneConfig, merge(canonical(FinetuneConfig, config.to_dict(), "the config"),
                                                      canonical(FinetuneConfig, saved, f"{config.resume}'s settings")))
    accelerator = Accelerator(cpu=processes_without_gpu())
    settings = flat_settings(config.to_dict())
    shown = [k for k in EVAL_SETTINGS if settings[k] != []]  # an empty mean / std means ImageNet's: not shown
    accelerator.print("eval at " + ", ".join(f"{k} {settings[k]}" + (" (saved with the model)" * (k in saved))
                                             for k in shown))
    _, val_set, classes = main_process_first(accelerator, lambda: datasets(config))
    model, metadata = load_for_eval(config, len(classes))
    batch_size = EVAL_AUTO_BATCH if config.auto_batch else config.batch_size  # no backward: any batch fits better
    loader = DataLoader(val_set, batch_size=batch_size, num_workers=config.num_workers,
                        collate_fn=CollateUnreadable())
    model, loader = accelerator.prepare(model, loader)
    result = evaluate(model, loader, accelerator, progress=config.progress and sys.stdout.isatty())
    recorded = f" (recorded when saved: {float(metadata['val_acc1']):.2f})" if "val_acc1" in metadata else ""
    accelerator.print(f"{config.resume}: val_acc1 {result['acc1']:.2f} val_acc5 {result['acc5']:.2f} on "
                      f"{counted(result, 'images')}{recorded}")
    accelerator.end_training()  # destroys the process group: see fcmae.training.end_process_group
    return result


def main(argv: Sequence[str] | None = None) -> dict | None:
    config = parse_config(FinetuneConfig, argv, description=__doc__, demo=DEMO_CONFIG)
    if config.eval:
        return evaluate_only(config)
    mixing = config.mixup > 0 or config.cutmix > 0
    if mixing and not config.auto_batch and config.batch_size % 2:
        raise ConfigError(f"batch_size must be even with mixup/cutmix (pairs are mixed), got {config.batch_size}")

    if config.finetune and not Path(config.finetune).exists():  # before any data is written
        root = Path(__file__).resolve().parent
        hint = (f" (the demo starts from: {script_command(root / 'pretrain.py', '--config', root / PRETRAIN_DEMO)})"
                if "digits-pretrain" in config.finetune else "")
        raise FileNotFoundError(f"--finetune checkpoint not found: {config.finetune}{hint}")
    run = Run(config, project="fcmae-finetune", step_log=names.TRAIN_LOG,
              command=invocation(__file__, argv, DEMO_CONFIG))
    # "digits:FOLDER" is written once, by the main process; an error there ends every process with its message
    train_set, val_set, classes = run.main_process_first(lambda: datasets(config))
    config.check_data_channels(train_set[0]["image"].shape[0])
    rgb_only = [f"--{name.replace('_', '-')}" for name in ("aa", "color_jitter", "reprob") if getattr(config, name)]
    if isinstance(train_set.transform, PretrainTransform) and rgb_only:
        run.print(f"note: {', '.join(rgb_only)} apply to 8-bit RGB photos only: off for this "
                  f"{config.model.in_chans}-channel array data (random resized crop, flip, mixup and cutmix stay)")
    model = build_model(config, len(classes), run.print).to(run.accelerator.device)

    def trial_step(batch_size: int) -> None:  # --batch-size auto: one forward and backward at this size
        images = torch.randn(batch_size, config.model.in_chans, *config.img_size, device=run.accelerator.device)
        with run.accelerator.autocast():
            loss = model(images).float().logsumexp(dim=1).mean()  # a cross-entropy's cost, without labels
        loss.backward()
        model.zero_grad(set_to_none=True)

    run.choose_batch_size(trial_step, len(train_set))
    if mixing and config.batch_size % 2:
        raise ConfigError(f"batch_size must be even with mixup/cutmix (pairs are mixed), got {config.batch_size}")
    run.plan_batches(len(train_set))
    lr = run.base_lr()
    optimizer = optimizer_for(model, config, lr)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=True,
                              num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                              collate_fn=CollateUnreadable(), worker_init_fn=quiet_worker)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, num_workers=config.num_workers,
                            collate_fn=CollateUnreadable(), worker_init_fn=quiet_worker)  # a SIGTERM mid-evaluation
    model, optimizer, train_loader = run.prepare(model, optimizer, train_loader)
    val_loader = run.accelerator.prepare(val_loader)
    ema = None
    if config.model_ema:
        ema = ModelEmaV3(run.unwrapped_model, decay=config.model_ema_decay)
        run.extra_state["ema"] = ema
    run.print(f"{config.model.name}{' (linear probe)' if config.linear_probe else ''}: {len(classes)} classes, "
              f"{len(train_set)} train / {len(val_set)} val images\n{run.describe()}")

    mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                  num_classes=len(classes)) if mixing else None
    if mixup is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif config.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(config.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    epoch_loss = torch.zeros(2, device=run.accelerator.device, dtype=torch.float64)  # sum, batches

    def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        images, targets = batch["image"], batch["label"]
        if mixup is not None:
            images, targets = mixup(images, targets)
        loss = criterion(model(images), targets)
        epoch_loss[0] += loss.detach().double()
        epoch_loss[1] += 1
        return loss, images.shape[0]

    def update_ema(step: int) -> None:
        if ema is not None:
            ema.update(run.unwrapped_model, step=step)

    def end_of_epoch(epoch: int) -> None:
        sums = run.accelerator.reduce(epoch_loss.clone(), reduction="sum")
        epoch_loss.zero_()
        record = {"step": run.step, "epoch": epoch, "train_loss": float(sums[0] / sums[1].clamp_min(1)),
                  "lr": max(group["lr"] for group in optimizer.param_groups)}
        candidates = {"raw": (run.unwrapped_model, evaluate(model, val_loader, run.accelerator, run.show_progress))}
        record.update(val_acc1=candidates["raw"][1]["acc1"], val_acc5=candidates["raw"][1]["acc5"])
        if ema is not None and config.model_ema_eval:
            candidates["ema"] = (ema.module, evaluate(ema.module, val_loader, run.accelerator, run.show_progress))
            record.update(ema_acc1=candidates["ema"][1]["acc1"], ema_acc5=candidates["ema"][1]["acc5"])
        run.write_record(record, run.output_dir / names.METRICS)
        which, (best_model, result) = max(candidates.items(), key=lambda item: item[1][1]["acc1"])
        run.print(f"epoch {epoch}: train_loss {record['train_loss']:.4f} val_acc1 {record['val_acc1']:.2f}"
                  + (f" ema_acc1 {record['ema_acc1']:.2f}" if "ema_acc1" in record else "")
                  + (f", top-1 over {counted(result, 'val images')}" if result["unreadable"] else ""))
        if result["acc1"] > run.info.get("best_acc1", -1.0):
            run.info.update(best_acc1=result["acc1"], best_epoch=epoch, best_weights=which)
            if run.is_main:
                save_best(best_model, config, classes, which, epoch, result, run.output_dir / names.CLASSIFIER)

    fit(run, step_fn, every_step=update_ema, on_epoch_end=end_of_epoch)
    best = run.output_dir / names.CLASSIFIER
    where = best if best.is_file() else "not rewritten here (no epoch beat the resumed checkpoint's best)"
    run.print(f"best val_acc1 {run.info.get('best_acc1', float('nan')):.2f} ({run.info.get('best_weights')} "
              f"weights, epoch {run.info.get('best_epoch')}): {where}")
    return run.info


def counted(result: dict, noun: str) -> str:
    """The images an `evaluate` result counts: '6 images', or '5 of 6 images (1 unreadable)'."""
    images, unreadable = result["images"], result["unreadable"]
    return f"{images} of {images + unreadable} {noun} ({unreadable} unreadable)" if unreadable else f"{images} {noun}"


def save_best(model: nn.Module, config: FinetuneConfig, classes: list[str], which: str, epoch: int,
              result: dict, path: Path) -> None:
    """The best weights in timm layout (a probe folds its BatchNorm into the classifier), atomically."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.linear_probe:
        state = fold_probe(state)
    settings = flat_settings(config.to_dict())  # the flags' names: in_chans at the top, as before models nested
    metadata = {"format": "timm", "model": config.model.name, "num_classes": str(len(classes)),
                "classes": json.dumps(classes), "weights": which, "epoch": str(epoch),
                "val_acc1": f"{result['acc1']:.4f}", "val_acc5": f"{result['acc5']:.4f}",
                "linear_probe": str(config.linear_probe).lower(),
                **{key: json.dumps(settings[key]) for key in EVAL_SETTINGS}}
    write_safetensors(state, path, metadata)


if __name__ == "__main__":
    sys.exit(run_cli(main))
