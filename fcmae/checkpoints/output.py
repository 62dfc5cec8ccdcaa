"""Output folders and failed writes: one line that names the path and the fix, instead of raw errno text."""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["OutputError", "check_output_folder", "explain_write_error", "file_mode"]


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


def explain_write_error(error: BaseException, path: str | os.PathLike, what: str = "write") -> OutputError:
    """An OutputError for `error` (an OSError, or torch/safetensors' wrappers of one) raised writing `path`."""
    code = getattr(error, "errno", None)
    text = str(error)
    if code is None:  # torch.save and safetensors wrap the OSError in their own types: recover the cause
        cause = error.__cause__ or error.__context__
        code = getattr(cause, "errno", None)
        if code is None and ("No space left" in text or "file write failed" in text):
            code = errno.ENOSPC
    fix = _FIXES.get(code) or (text.strip().splitlines() or ["unknown error"])[0]
    return OutputError(code or 0, f"cannot {what} {path}: {fix}")


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


def _fix(error: OSError, flag: str) -> str:
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a file is in the way of a folder on this path; remove it or choose another {flag}"
    return _FIXES.get(error.errno, str(error.strerror or error)).replace("choose a folder", f"choose a {flag}")


def file_mode() -> int:
    """The mode a new file gets under the process umask (0o644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
