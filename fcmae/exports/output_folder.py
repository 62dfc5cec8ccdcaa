"""Output folders of the exports: checked before anything is converted, written atomically.

An existing folder is replaced only with --overwrite, only if it holds nothing but files an export writes (so a
run folder or a folder of other work is never deleted), and never if it holds the input. Its files get the mode the
umask gives, as every other file fcmae writes (transformers' `save_pretrained` leaves model.safetensors 0600).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..checkpoints.output import file_mode

__all__ = ["EXPORT_FILES", "check_output_folder", "write_folder"]

EXPORT_FILES = frozenset({"model.safetensors", "config.json", "preprocessor_config.json", "README.md"})


def check_output_folder(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool) -> None:
    """Raise ValueError (one line) if `output` cannot become an export folder of `source`."""
    out, src = Path(output), Path(source)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{output} is a file; this export writes a folder: give a folder name")
    if out.exists() and src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise ValueError(f"the output folder {output} holds the input {source}; write the export to a new folder")
    if out.exists():
        if not overwrite:
            raise ValueError(f"{output} exists; pass --overwrite to replace it, or choose another output folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            raise ValueError(f"{output} holds files no export writes ({', '.join(foreign[:5])}); --overwrite only "
                             "replaces an earlier export: choose another output folder")
    if not out.absolute().parent.is_dir():
        raise FileNotFoundError(f"no such folder for {out.name}: {out.absolute().parent}")


def write_folder(output: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(folder)` on a fresh hidden folder beside `output`, give its files the umask's mode, then put it in
    place of `output`.

    A failure leaves no partial folder and any earlier export at `output` as it was.
    """
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        mode = file_mode()
        for file in tmp.iterdir():
            if file.is_file():
                os.chmod(file, mode)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
