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

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, default_collate

import fcmae
from fcmae.checkpoints import names
from fcmae.config import PretrainConfig, parse_config
from fcmae.data import CollateUnreadable, augment_batch, collate_encoded, pretrain_dataset, pretrain_sampler
from fcmae.knn_monitor import KNNMonitor
from fcmae.training import Run, quiet_worker, run_cli
from fcmae.visualize import sample_indices, save_reconstructions

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
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
    run = Run(config, project="fcmae-pretrain")
    # digits written, a folder indexed, shards counted: by the main process; an error there ends every process
    # with its one-line message
    mean, std = config.normalization()
    monitor = run.main_process_first(lambda: KNNMonitor(  # checked at start, then each process loads its share
        config.monitor_data, config.image_size, mean, std, config.in_channels, run.accelerator.process_index,
        run.accelerator.num_processes, config.batch_size, config.num_workers)) if config.monitor_data else None
    dataset = run.main_process_first(lambda: pretrain_dataset(config.data_path, config.image_size, config.seed, mean,
                                                              std, encoded=config.gpu_augment))
    sampler = pretrain_sampler(dataset, config.batch_size, run.accelerator.num_processes, config.seed)
    collate = CollateUnreadable(collate_encoded if config.gpu_augment else default_collate)  # + batch["unreadable"]
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                        collate_fn=collate, persistent_workers=False,
                        worker_init_fn=quiet_worker)  # fresh workers see the epoch's seed
    device = run.accelerator.device

    def images_of(batch: dict) -> torch.Tensor:
        """The batch's images on the device: (N, C, H, W), augmented there first with --gpu-augment."""
        if config.gpu_augment:
            return augment_batch(batch["image"], config.image_size, device, mean or IMAGENET_DEFAULT_MEAN,
                                 std or IMAGENET_DEFAULT_STD)
        return batch["image"].to(device, non_blocking=True)  # a no-op where Accelerate placed the batch

    # Fixed images for the reconstruction grids: drawn at random with the run's seed, epoch-0 augmentation.
    vis_images = images_of(collate([dataset[i] for i in sample_indices(VIS_IMAGES, len(dataset), config.seed)]))
    config.check_data_channels(vis_images.shape[1])
    model = build_model(config, run.print)
    run.plan_batches(len(dataset))
    for module in model.modules():  # conv weights in the activations' channels-last format, as their grads are
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    if config.compile:  # before prepare: DDP then wraps a module whose forward calls the compiled step
        model.compile_step()
    lr = run.base_lr()
    cuda = run.accelerator.device.type == "cuda"  # fused AdamW: one kernel for all parameters on the GPU
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                    fused=cuda or None)
    model, optimizer, loader = run.prepare(model, optimizer, loader, place_batches=not config.gpu_augment)
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
            record = monitor.evaluate(run.unwrapped_model.encoder, run.accelerator)  # on every process: a collective
            run.write_record({"step": step, **record})
            run.print(f"step {step}: knn_top1 {record['knn_top1']:.2f} ({record['knn_seconds']:.1f} s)")

    def save_model_file(checkpoint: Path) -> None:
        fcmae.save_model(run.unwrapped_model, run.output_dir / names.PRETRAINED_MODEL,
                         {"step": str(run.step), "checkpoint": checkpoint.name})

    def step_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        images = images_of(batch)
        loss, _, _ = model(images)
        return loss, images.shape[0]

    run.fit(step_fn, every_step=every_step, on_save=save_model_file)
    run.print(f"done: {run.output_dir / names.PRETRAINED_MODEL}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
