"""Output files and folders, in one place: their checks (before anything is computed), their atomic writes (a
temporary file or folder, then a rename), and failed writes as one line that names the path and the fix, instead
of raw errno text."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from .names import ACCELERATE_WEIGHTS, EXPORT_FILES

__all__ = ["OutputError", "check_output_folder", "check_output_file", "check_export_folder", "write_file_atomically",
           "write_folder_atomically", "explain_write_error", "free_space", "file_mode"]


class OutputError(OSError):
    """A file or folder could not be written; the message names the path and what to do."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno N] ..."
        return self.strerror or super().__str__()


_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose a folder on another disk",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose a folder on a writable disk",
    errno.ENOTDIR: "a file is in the way of a folder on this path; remove it or choose another path",
    errno.EEXIST: "a file is in the way of a folder on this path; remove it or choose another path",
}


# How libraries that wrap the OSError report a full disk or quota: safetensors ("I/O error: No space left on device
# (os error 28)", or older "IoError(Os { code: 28, kind: StorageFull, ... })"), and torch.save, whose C++ writer
# only says that the write went wrong ("file write failed", "unexpected pos 576 vs 534").
_TEXT_ERRNOS = [
    (errno.ENOSPC, ("No space left", "os error 28", "code: 28", "StorageFull", "file write failed", "unexpected pos")),
    (errno.EDQUOT, ("Disk quota exceeded", "os error 122", "code: 122", "QuotaExceeded")),
]

LOW_SPACE = 1 << 20  # bytes: a write that failed with less than this free ran out of space, whatever it said


def explain_write_error(error: BaseException, path: str | os.PathLike, what: str = "write") -> OutputError:
    """An OutputError for `error`, raised writing `path` by any library (OSError, torch's RuntimeError,
    safetensors' SafetensorError, ...): one line that names the path and the fix.

    A full disk is recognized by its errno, by the libraries' own wording, and, as the rule for everything else,
    by the free space left on `path`'s file system. So call this before removing what the failed write left (the
    partial file still holds the space).
    """
    code = _errno_in_chain(error) or _errno_in_text(str(error))
    if code is None and free_space(path) < LOW_SPACE:
        code = errno.ENOSPC
    fix = _FIXES.get(code) or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return OutputError(code or 0, f"cannot {what} {path}: {fix}")


def _errno_in_chain(error: BaseException | None) -> int | None:
    """The errno of `error` or of an error it was raised from (torch wraps the OSError in its own type)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None):
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def _errno_in_text(text: str) -> int | None:
    return next((code for code, words in _TEXT_ERRNOS if any(word in text for word in words)), None)


def free_space(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path` (or its nearest existing
    folder); a large number when that cannot be told."""
    for folder in (Path(path), *Path(path).absolute().parents):
        try:
            stats = os.statvfs(folder)
        except OSError:  # not there (yet): its parent's file system will hold it
            continue
        return stats.f_bavail * stats.f_frsize
    return 1 << 62


def check_output_folder(folder: str | os.PathLike, flag: str = "--output-dir", create: bool = True) -> Path:
    """Check that `folder` can hold files (create it, or with create=False only check that it could be created);
    OutputError (one line, naming the path and the fix) if not."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = f"{flag} {folder} is a file" if existing == folder else f"{existing} (on the way to {folder}) is a file"
        raise OutputError(errno.ENOTDIR, f"{where}, not a folder; remove it or choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"cannot write in {existing}" + (f" to create {flag} {folder}" if existing
                          != folder else f" ({flag})") + f": permission denied; choose a folder you can write to "
                          f"with {flag}")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(e.errno, f"cannot create {flag} {folder}: {_fix(e, flag)}") from None
    return folder


def check_output_file(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool,
                      suffixes: tuple[str, ...] = (".safetensors",)) -> None:
    """A conversion's output file: a .safetensors file (timm and fcmae.load_model pick the reader by suffix; an
    export may allow other `suffixes`), and never the input itself: converting a model file onto itself would
    replace it, decoder and all, with the converted weights. Another existing file is replaced only with
    `overwrite` (it may be a run's model file)."""
    out, src = Path(output), Path(source)
    if out.suffix not in suffixes:
        raise ValueError(f"the output must be a {' or '.join(suffixes)} file, got {output}")
    read = src / ACCELERATE_WEIGHTS if src.is_dir() else src
    if out.exists() and read.exists() and out.samefile(read):
        raise ValueError(f"the output {output} is the input file; write the conversion to a new file")
    if out.is_file() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it, or choose another output file")


def check_export_folder(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool) -> None:
    """An export's output folder (`check_output_file`'s twin): ValueError (one line) if `output` cannot become an
    export folder of `source`.

    An existing folder is replaced only with `overwrite`, only if it holds nothing but files an export writes
    (EXPORT_FILES: a run folder or a folder of other work is never deleted), and never if it holds the input.
    """
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


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on `path` + ".tmp", give the file the umask's mode, then rename it over `path`: every file
    fcmae writes whole (model files, safetensors and torch.save exports) goes through here.

    A failure (no permission, full disk, the writer's own error) raises OutputError with a one-line reason and the
    fix, removes the temporary file and leaves any earlier file at `path` as it was. Libraries that write their
    own temporary file would leave it 0600 (safetensors does); the chmod gives the mode every other file gets.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder for {path.name}: {path.parent}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except Exception as e:  # safetensors and torch report I/O failures as their own error types
        reason = explain_write_error(e, path)  # while the partial file still fills a full disk: it tells
        tmp.unlink(missing_ok=True)
        raise reason from None


def write_folder_atomically(output: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(folder)` on a fresh hidden folder beside `output`, give its files the umask's mode (transformers'
    `save_pretrained` leaves model.safetensors 0600), then put it in place of `output`.

    A failure leaves no partial folder and any earlier folder at `output` as it was.
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
    return out


def _fix(error: OSError, flag: str) -> str:
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a file is in the way of a folder on this path; remove it or choose another {flag}"
    return _FIXES.get(error.errno, str(error.strerror or error)).replace("choose a folder", f"choose a {flag}")


def file_mode() -> int:
    """The mode a new file gets under the process umask (0o644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
