"""fcmae-convert / python -m fcmae.convert: INPUT OUTPUT --to {timm,fcmae,transformers,official}."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..config.command_line import OneLineArgumentParser
from .exits import debugging, print_error, show_causes

__all__ = ["main", "CLI_TARGETS"]

# The options that only make sense for one target (argparse dest -> target; None when not given).
_TARGET_OPTIONS = {"conv_mlp": "timm", "decoder_depth": "fcmae", "decoder_embed_dim": "fcmae"}
# fcmae.convert.TARGETS (files), then fcmae.exports' targets; spelled out here so that --help imports no torch.
CLI_TARGETS = ("timm", "fcmae", "transformers", "official")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="fcmae-convert",
        description="Convert ConvNeXt V2 / FCMAE checkpoints (this project's, official MinkowskiEngine or dense, "
                    "timm) to timm weights or a Hub-ready timm folder, a full FCMAE model file, a Hugging Face "
                    "transformers folder, or the official dense layout.",
    )
    parser.add_argument("input", help="model.safetensors, a training-state folder, an official .pt/.pth, or timm "
                                      "weights")
    parser.add_argument("output", help="the .safetensors file to write; a folder for --to transformers, and for "
                                       "--to timm (Hub-ready) when not named .safetensors; .pth or .safetensors for "
                                       "--to official")
    parser.add_argument("--to", required=True, choices=CLI_TARGETS,
                        help="timm: weights (or a folder) for timm.create_model; fcmae: a model file for "
                             "fcmae.load_model; transformers: a folder for ConvNextV2Model.from_pretrained; official: "
                             "the official dense layout (downsample_layers.*, stages.*)")
    parser.add_argument("--model", help="model name, e.g. atto or convnextv2_tiny (default: inferred from shapes)")
    parser.add_argument("--conv-mlp", action=argparse.BooleanOptionalAction, default=None,
                        help="--to timm: MLP as 1x1 convs or Linear (default: timm's default for the model)")
    parser.add_argument("--decoder-depth", type=int, help="--to fcmae: depth of a fresh decoder (default 1)")
    parser.add_argument("--decoder-embed-dim", type=int, help="--to fcmae: width of a fresh decoder (default 512)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="allow a partial decoder or head, drop a classifier head for --to fcmae; reports skips")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input; a "
                                                                      "folder only if it holds an earlier export)")
    parser.add_argument("--drop-head", action="store_true", default=None,
                        help="leave out the input's classifier head")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this Hugging Face Hub "
                                                              "model repo (needs huggingface_hub and a login)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a one-line `error:` on stderr for a bad input)."""
    try:
        args = _parser().parse_args(argv)
        misplaced = [(f"--{o.replace('_', '-')}", t) for o, t in _TARGET_OPTIONS.items()
                     if t != args.to and getattr(args, o) is not None]
        if misplaced:
            verb = "apply" if len(misplaced) > 1 else "applies"
            raise ValueError(f"{', '.join(o for o, _ in misplaced)} {verb} only to --to {misplaced[0][1]}")
        # torch, timm and the converter import here, after the flags: --help and a bad flag answer at once.
        from ..checkpoints.output import check_output_file
        from ..convert import convert, save_conversion
        from ..exports.targets import export, is_export

        if is_export(args.to, args.output) or args.push_to_hub:
            print("\n".join(export(args.input, args.output, args.to, args.model, conv_mlp=args.conv_mlp,
                                    strict=args.strict, drop_head=bool(args.drop_head), overwrite=args.overwrite,
                                    push_to_hub=args.push_to_hub)))
            return 0
        check_output_file(args.input, args.output, args.overwrite)
        result = convert(args.input, args.to, args.model, conv_mlp=args.conv_mlp, decoder_depth=args.decoder_depth,
                         decoder_embed_dim=args.decoder_embed_dim, strict=args.strict, drop_head=bool(args.drop_head))
        save_conversion(result, args.output)
    except (ValueError, OSError) as e:  # user mistakes: one line, no traceback (unless FCMAE_DEBUG=1)
        if debugging():
            show_causes(e)
            raise
        print_error(' '.join(str(e).split()))
        return 2
    print("\n".join(result.notes))
    print(f"wrote {len(result.state)} {args.to} tensors to {args.output}")
    if args.to == "timm":
        extra = "".join(f", {k}={v!r}" for k, v in result.timm_kwargs.items())
        print(f"use: timm.create_model({result.timm_name!r}, num_classes=K{extra}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(args.output)!r}))")
    else:
        print(f"use: fcmae.load_model({str(args.output)!r})")
    return 0

