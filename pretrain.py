"""FCMAE pretraining of ConvNeXt V2 on a folder of images or webdataset shards.

    accelerate launch pretrain.py --config configs/pretrain/convnextv2_base.yaml --data-path /data/imagenet
    python pretrain.py                                   # the embedded demo (configs/demo.yaml)
    python pretrain.py --config configs/demo.yaml --max-steps 50   # the demo, with overrides
    accelerate launch --mixed_precision bf16 pretrain.py --compile --config ...   # GPU speed

Config -> data -> FCMAE model -> the shared Accelerate loop (fcmae.training).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from fcmae.cli import check_command_line, run_cli
from fcmae.config import ConfigError, PretrainConfig, parse_config

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
if __name__ == "__main__":  # --help and a bad flag are answered here, before torch and timm import (seconds)
    check_command_line(PretrainConfig, description=__doc__, demo=DEMO_CONFIG)

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

import fcmae
from fcmae.checkpoints import names
from fcmae.data import (
    CollateUnreadable, DeviceAugment, DeviceFeed, DevicePixels, collate_encoded, collate_pixels, pretrain_dataset,
    pretrain_sampler,
)
from fcmae.knn_monitor import KNNMonitor
from fcmae.training import Run, fit, quiet_worker, use_compile_cache
from fcmae.training.invocation import invocation
from fcmae.visualize import sample_indices, save_reconstructions

VIS_IMAGES = 8


def build_model(config: PretrainConfig, say=print) -> fcmae.FCMAE:
    """A fresh FCMAE model, or one whose weights come from config.init_from (not its training state), any input
    `fcmae.load` reads; `say` gets the converter's notes (what was detected, dropped or freshly initialized)."""
    model = fcmae.FCMAE(config.model)
    if config.init_from:
        from fcmae.convert import convert

        result = convert(config.init_from, "fcmae", model=config.model.name, decoder_depth=config.model.decoder_depth,
                         decoder_embed_dim=config.model.decoder_embed_dim, drop_head=True)  # a fine-tuned model's head
        for note in result.notes:
            say(f"--init-from: {note}")
        fcmae.checkpoints.load_state_dict_strict(model, result.state, source=config.init_from)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(PretrainConfig, argv, description=__doc__, demo=DEMO_CONFIG)
    run = Run(config, project="fcmae-pretrain", command=invocation(__file__, argv, DEMO_CONFIG))
    device = run.accelerator.device
    if config.compile:
        use_compile_cache(config.compile_cache)  # before anything compiles
    # digits written, a folder indexed, shards counted: by the main process; an error there ends every process
    # with its one-line message. Photos stay uint8 until they reach the device (DevicePixels normalizes there).
    mean, std = config.normalization()
    monitor = KNNMonitor.start(run.accelerator, config.monitor_data, config.img_size, mean, std,
                               config.model.in_chans, config.num_workers) if config.monitor_data else None
    dataset = run.main_process_first(lambda: pretrain_dataset(config.data_path, config.img_size, config.seed, mean,
                                                              std, encoded=config.gpu_augment, normalize=False))
    mean, std = mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
    collate = CollateUnreadable(collate_encoded if config.gpu_augment else collate_pixels)  # + batch["unreadable"]
    # The batch's images on the device, (N, C, H, W) normalized; with --gpu-augment decoded and augmented there
    images_of = DeviceAugment(device, config.img_size, mean, std) if config.gpu_augment else \
        DevicePixels(device, mean, std)

    def transfer(batch: dict) -> dict:  # DeviceFeed's: the next batch, while the step before runs
        return {**batch, "image": images_of(batch["image"])}

    # Fixed images for the reconstruction grids: drawn at random with the run's seed, epoch-0 augmentation.
    vis_batch = collate([dataset[i] for i in sample_indices(VIS_IMAGES, len(dataset), config.seed)])
    vis_images = images_of(vis_batch["image"])
    config.check_data_channels(vis_images.shape[1])
    model = build_model(config, run.print)
    for module in model.modules():  # conv weights in the activations' channels-last format, as their grads are
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    model.to(device)

    def trial_step(batch_size: int) -> None:  # --batch-size auto: one eager forward and backward at this size
        images = torch.randn(batch_size, config.model.in_chans, *config.img_size, device=device)
        with run.accelerator.autocast():
            loss, _, _ = model(images.contiguous(memory_format=torch.channels_last))
        loss.backward()
        model.zero_grad(set_to_none=True)

    run.choose_batch_size(trial_step, len(dataset))
    run.plan_batches(len(dataset))
    if config.compile:  # before prepare: DDP then wraps a module whose forward calls the compiled step
        model.compile_step(mode=config.compile_mode or None)
        if model.replays_cuda_graphs and config.accum_steps > 1:
            raise ConfigError(f"--compile-mode {config.compile_mode} replays CUDA graphs, which fcmae has not verified "
                              f"with gradient accumulation (accum_steps {config.accum_steps}); reach the effective "
                              "batch without it (--batch-size auto, more processes) or use --compile-mode "
                              "max-autotune-no-cudagraphs")
        run.compile_once(lambda: trial_step(config.batch_size))
    sampler = pretrain_sampler(dataset, config.batch_size, run.accelerator.num_processes, config.seed)
    workers = config.num_workers
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        worker_init_fn=quiet_worker)  # workers read the epoch from shared memory (fcmae.data)
    lr = run.base_lr()
    cuda = device.type == "cuda"  # fused AdamW: one kernel for all parameters on the GPU
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                    fused=cuda or None)
    # Batches stay on the host in the loader: DeviceFeed moves (or augments) them on a side stream, a step ahead.
    model, optimizer, loader = run.prepare(model, optimizer, loader, place_batches=False)
    run.print(f"{config.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(dataset)} images\n{run.describe()}")
    if monitor is not None:
        run.print(monitor.describe() + f", every {config.monitor_every} steps")

    def visualize(step: int) -> None:
        due = (config.vis_every and step % config.vis_every == 0) or run.at == run.total_steps
        if due and run.is_main:
            with run.accelerator.autocast():
                grid = save_reconstructions(run.unwrapped_model, vis_images, run.output_dir / names.VIS /
                                            f"step_{step:08d}.png", seed=config.seed)
            if "tensorboard" in config.log_with:
                run.accelerator.get_tracker("tensorboard", unwrap=True).add_image("reconstructions", grid, step)

    def every_step(step: int) -> None:
        visualize(step)
        if monitor is not None and (step % config.monitor_every == 0 or run.at == run.total_steps):
            record = monitor.evaluate(run.unwrapped_model.encoder, run.accelerator, config.batch_size)  # a collective
            run.write_record({"step": step, **record})
            run.print(f"step {step}: knn_top1 {record['knn_top1']:.2f} ({record['knn_seconds']:.1f} s)")

    def save_model_file(checkpoint: Path) -> None:
        fcmae.save_model(run.unwrapped_model, run.output_dir / names.PRETRAINED_MODEL,
                         {"step": str(run.step), "checkpoint": checkpoint.name})

    def step_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        images = batch["image"]  # on the device, normalized (DeviceFeed)
        loss, _, _ = model(images)
        return loss, images.shape[0]

    fit(run, step_fn, every_step=every_step, on_save=save_model_file, feed=DeviceFeed(transfer, device))
    run.print(f"done: {run.output_dir / names.PRETRAINED_MODEL}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
