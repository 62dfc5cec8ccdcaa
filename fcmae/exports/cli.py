"""The exports behind `fcmae-convert`: `--to transformers` (a folder), `--to official` (a file), `--to timm` into a
folder (Hub-ready), and `--push-to-hub REPO` for the folders. `fcmae.convert.main` parses the flags and hands
these targets here."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import convert
from .hub import push_folder
from .official_layout import OFFICIAL_SUFFIXES, write_official
from .output_folder import check_output_folder, write_folder
from .source_info import describe_source
from .timm_folder import write_timm_folder
from .transformers_folder import write_transformers_folder

__all__ = ["EXPORT_TARGETS", "FILE_SUFFIXES", "writes_folder", "is_export", "run_export"]

EXPORT_TARGETS = ("transformers", "official")
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")  # an output named so is a file, never a folder


def writes_folder(to: str, output: str) -> bool:
    """Whether `--to TO OUTPUT` writes a folder: always for transformers; for timm unless OUTPUT is a file name."""
    return to == "transformers" or (to == "timm" and Path(output).suffix not in FILE_SUFFIXES)


def is_export(to: str, output: str) -> bool:
    """Whether this module, not the plain file conversion, handles `--to TO OUTPUT`."""
    return to in EXPORT_TARGETS or writes_folder(to, output)


def run_export(args: argparse.Namespace, check_file_output) -> list[str]:
    """Convert `args.input` and write the export `args.to` at `args.output`; push the folder with --push-to-hub
    (`fcmae.convert.main` has checked that the output is a folder).

    `check_file_output(source, output, overwrite, suffixes)` checks a file output (fcmae.convert's own check).
    Returns the lines to print. Raises ValueError / OSError (one line) for bad input, before writing anything.
    """
    if writes_folder(args.to, args.output):
        check_output_folder(args.input, args.output, args.overwrite)
    else:
        check_file_output(args.input, args.output, args.overwrite, OFFICIAL_SUFFIXES)
    # timm's names are the hub between layouts; transformers and the official model use Linear MLPs.
    conv_mlp = args.conv_mlp if args.to == "timm" else False
    result = convert(args.input, "timm", args.model, conv_mlp=conv_mlp, strict=args.strict,
                     drop_head=bool(args.drop_head))
    info = describe_source(args.input, result)

    if args.to == "official":
        count = write_official(result, args.output)
        return [*result.notes, f"wrote {count} tensors in the official ConvNeXt V2 layout to {args.output}",
                f"use: the official code or a ConvNeXt V2 detection backbone reads checkpoint['model'] of "
                f"{args.output}"]
    if args.to == "transformers":
        write_folder(args.output, lambda d: write_transformers_folder(result, info, d))
        cls = "ConvNextV2ForImageClassification" if "head.fc.weight" in result.state else "ConvNextV2Model"
        use = f"use: transformers.{cls}.from_pretrained({str(args.output)!r}), AutoImageProcessor likewise"
    else:
        write_folder(args.output, lambda d: write_timm_folder(result, info, d))
        use = f"use: timm.create_model({'local-dir:' + str(args.output)!r}, pretrained=True)"
    lines = [*result.notes, f"wrote a {args.to} folder to {args.output} (model.safetensors, config.json, "
                            f"{'preprocessor_config.json, ' if args.to == 'transformers' else ''}README.md)", use]
    if args.push_to_hub:
        lines.append(f"pushed to {push_folder(args.output, args.push_to_hub)}")
    return lines
