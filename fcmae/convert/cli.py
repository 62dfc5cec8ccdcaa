"""fcmae-convert / python -m fcmae.convert: INPUT OUTPUT --to {timm,fcmae,transformers,official}."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..config import OneLineArgumentParser
from .conversion import TARGETS, convert, save_conversion

__all__ = ["main", "check_output", "CLI_TARGETS"]

# The options that only make sense for one target (argparse dest -> target; None when not given).
_TARGET_OPTIONS = {"conv_mlp": "timm", "decoder_depth": "fcmae", "decoder_embed_dim": "fcmae"}
CLI_TARGETS = (*TARGETS, "transformers", "official")


def check_output(source: str, output: str, overwrite: bool, suffixes: tuple[str, ...] = (".safetensors",)) -> None:
    """The output is a .safetensors file (timm and fcmae.load_model pick the reader by suffix; an export may allow
    other `suffixes`), and never the input itself: converting a model file onto itself would replace it, decoder and
    all, with the converted weights. Another existing file is replaced only with --overwrite (it may be a run's
    model.safetensors)."""
    out, src = Path(output), Path(source)
    if out.suffix not in suffixes:
        raise ValueError(f"the output must be a {' or '.join(suffixes)} file, got {output}")
    read = src / "model.safetensors" if src.is_dir() else src
    if out.exists() and read.exists() and out.samefile(read):
        raise ValueError(f"the output {output} is the input file; write the conversion to a new file")
    if out.is_file() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it, or choose another output file")


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
        from ..exports import cli as exports  # imports this module: loaded on use

        if exports.is_export(args.to, args.output) or args.push_to_hub:
            print("\n".join(exports.export(args.input, args.output, args.to, args.model, conv_mlp=args.conv_mlp,
                                            strict=args.strict, drop_head=bool(args.drop_head),
                                            overwrite=args.overwrite, push_to_hub=args.push_to_hub)))
            return 0
        check_output(args.input, args.output, args.overwrite)
        result = convert(args.input, args.to, args.model, conv_mlp=args.conv_mlp, decoder_depth=args.decoder_depth,
                         decoder_embed_dim=args.decoder_embed_dim, strict=args.strict, drop_head=bool(args.drop_head))
        save_conversion(result, args.output)
    except (ValueError, OSError) as e:  # user mistakes: one line, no traceback (unless FCMAE_DEBUG=1)
        from ..training.cli import debugging, print_error, show_causes

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

