"""The exports behind `fcmae-convert`: `--to transformers` (a folder), `--to official` (a file), `--to timm` into a
folder (Hub-ready), and `--push-to-hub REPO` for the folders. The command (`fcmae.cli.convert`) parses the flags
and hands these targets to `export`, which is also the Python API:

    from fcmae.exports import export
    print("\n".join(export("output/demo/fcmae_model.safetensors", "atto-hf", "transformers")))
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoints.output import check_export_folder, check_output_file, write_folder_atomically
from ..convert import convert
from .hub import push_folder
from .official_layout import OFFICIAL_SUFFIXES, describe_official, write_official
from .source_info import describe_source
from .timm_folder import write_timm_folder
from .transformers_folder import write_transformers_folder

__all__ = ["EXPORT_TARGETS", "FILE_SUFFIXES", "writes_folder", "is_export", "export"]

EXPORT_TARGETS = ("transformers", "official")
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")  # an output named so is a file, never a folder


def writes_folder(to: str, output: str) -> bool:
    """Whether `--to TO OUTPUT` writes a folder: always for transformers; for timm unless OUTPUT is a file name."""
    return to == "transformers" or (to == "timm" and Path(output).suffix not in FILE_SUFFIXES)


def is_export(to: str, output: str) -> bool:
    """Whether this module, not the plain file conversion, handles `--to TO OUTPUT`."""
    return to in EXPORT_TARGETS or writes_folder(to, output)


def export(source: str, output: str, to: str, model: str | None = None, *, conv_mlp: bool | None = None,
           strict: bool = True, drop_head: bool = False, overwrite: bool = False,
           push_to_hub: str | None = None) -> list[str]:
    """Convert `source` (anything `fcmae.convert` reads) and write the export `to` ("transformers", "official", or
    "timm" into a folder) at `output`; upload the folder to the Hub repo `push_to_hub` if given.

    Returns what `fcmae-convert` prints: the conversion notes, what was written, how to load it. Raises ValueError /
    OSError with a one-line reason for a bad input (before anything is written) or a failed upload (the folder is
    kept). `model`, `conv_mlp` (timm only), `strict` and `drop_head` are `fcmae.convert.convert`'s.
    """
    folder = writes_folder(to, output)
    if push_to_hub and not folder:
        raise ValueError("--push-to-hub uploads a folder: use --to transformers, or --to timm with a folder as OUTPUT")
    if not is_export(to, output):
        raise ValueError(f"--to {to} into {output} is a plain conversion, not an export; use fcmae.convert")
    if folder:
        check_export_folder(source, output, overwrite)
    else:
        check_output_file(source, output, overwrite, OFFICIAL_SUFFIXES)  # the plain conversion's check
    # timm's names are the hub between layouts; transformers and the official model use Linear MLPs.
    result = convert(source, "timm", model, conv_mlp=conv_mlp if to == "timm" else False, strict=strict,
                     drop_head=drop_head)
    info = describe_source(result.loaded, result)  # what load() found: the input is not read again

    if to == "official":
        count = write_official(result, output)
        return [*result.notes, f"wrote {count} tensors in the official ConvNeXt V2 layout to {output}",
                *describe_official(result, output)]
    if to == "transformers":
        write_folder_atomically(output, lambda d: write_transformers_folder(result, info, d))
        cls = "ConvNextV2ForImageClassification" if "head.fc.weight" in result.state else "ConvNextV2Model"
        use = f"use: transformers.{cls}.from_pretrained({str(output)!r}), AutoImageProcessor likewise"
    else:
        write_folder_atomically(output, lambda d: write_timm_folder(result, info, d))
        use = f"use: timm.create_model({'local-dir:' + str(output)!r}, pretrained=True)"
    lines = [*result.notes, f"wrote a {to} folder to {output} (model.safetensors, config.json, "
                            f"{'preprocessor_config.json, ' if to == 'transformers' else ''}README.md)", use]
    if push_to_hub:
        lines.append(f"pushed to {push_folder(output, push_to_hub)}")
    return lines
