"""FCMAE pretraining of ConvNeXt V2 on a folder of images.

    accelerate launch pretrain.py --config configs/pretrain/convnextv2_base.yaml --data-path /data/imagenet
    python pretrain.py                                   # the embedded demo (configs/demo.yaml)
    python pretrain.py --max-steps 50                    # the demo, with overrides
    accelerate launch --mixed_precision bf16 pretrain.py --compile --config ...   # GPU speed

Config -> data -> FCMAE model -> the shared Accelerate loop (fcmae.training). Every flag is listed by --help.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

import fcmae
from fcmae.config import PretrainConfig, parse_config
from fcmae.data import pretrain_dataset
from fcmae.training import Run, run_cli
from fcmae.visualize import save_reconstructions

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
VIS_IMAGES = 8


def build_model(config: PretrainConfig) -> fcmae.FCMAE:
    """A fresh FCMAE model, or one whose weights come from config.init_from (not its training state)."""
    model = fcmae.create_model(config.model, **config.model_settings())
    if config.init_from:
        from fcmae.convert import to_fcmae

        state = to_fcmae(config.init_from, model=config.model, decoder_depth=config.decoder_depth,
                         decoder_embed_dim=config.decoder_embed_dim, drop_head=True)  # a fine-tuned model's head
        fcmae.checkpoints.load_state_dict_strict(model, state, source=config.init_from)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(PretrainConfig, argv, description=__doc__, demo=DEMO_CONFIG)
    run = Run(config, project="fcmae-pretrain")
    with run.accelerator.main_process_first():  # "digits:FOLDER" is written once, by the main process
        dataset = pretrain_dataset(config.data_path, config.image_size, config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)  # fresh workers each epoch see the epoch's seed
    model = build_model(config)
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
    model, optimizer, loader = run.prepare(model, optimizer, loader)
    run.print(f"{config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(dataset)} images\n{run.describe()}")

    # Fixed images for the reconstruction grids: the first few, with their epoch-0 augmentation.
    vis_images = torch.stack([dataset[i]["image"] for i in range(min(VIS_IMAGES, len(dataset)))])

    def visualize(step: int) -> None:
        due = (config.vis_every and step % config.vis_every == 0) or step == run.total_steps
        if due and run.is_main:
            model_ = run.unwrapped_model
            imgs = vis_images.to(run.accelerator.device)
            with run.accelerator.autocast():
                save_reconstructions(model_, imgs, run.output_dir / "vis" / f"step_{step:08d}.png", seed=config.seed)

    def save_model_file(checkpoint: Path) -> None:
        fcmae.save_model(run.unwrapped_model, run.output_dir / "model.safetensors",
                         {"step": str(run.step), "checkpoint": checkpoint.name})

    def step_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, _, _ = model(batch["image"])
        return loss, batch["image"].shape[0]

    run.fit(step_fn, every_step=visualize, on_save=save_model_file)
    run.print(f"done: {run.output_dir / 'model.safetensors'}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
