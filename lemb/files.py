"""Atomic writes: every file or folder lemb writes appears complete under its final name or not at all.

`atomic(final)` yields a temporary path beside `final` (same file system, hidden, named after the writing
process); the caller writes a file or a folder there; on success it is renamed over `final` in one step, on any
error it is removed. A reader never sees a half-written file, and a process killed midway leaves only a
`.NAME.tmp-PID` that the next run of its stage removes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lemb.errors import CannotWrite


def temporary_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic(final: str | Path) -> Iterator[Path]:
    """A temporary path to write `final` at; renamed into place when the block ends without an error. A folder
    replaces only a missing or empty `final` folder (use `move_aside` on an old one first). A full disk or a
    read-only folder, whichever library was writing, is one line naming `final` (CannotWrite)."""
    final = Path(final)
    tmp = temporary_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, final)
    except Exception as exc:
        problem = storage_problem(exc, final.parent)
        free = free_space(final.parent)  # before `finally` gives the temporary file's space back
        if problem is None:
            raise
        raise CannotWrite(final, f"{problem}; {free}") from None
    finally:
        remove(tmp)


# errors of the storage, not of lemb or of the data: a full disk or quota, a read-only or forbidden folder
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_FULL = 1 << 20  # less free than this where a write just failed: the disk is full, whatever the library said


def storage_problem(exc: BaseException, folder: Path) -> str | None:
    """What a failed write says about the storage, or None when it says nothing of it: an OSError's reason, or,
    for libraries that write in C++ or Rust and raise their own errors (torch's "unexpected pos", safetensors'
    I/O errors), a full disk under `folder`."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    try:
        full = shutil.disk_usage(_existing(folder)).free < _FULL
    except OSError:
        full = False
    if full:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return f"No space left on device: {lines[-1].strip() if lines else type(exc).__name__}"
    return None


def free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(_existing(folder)).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def _existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def move_aside(path: Path, tag: str) -> Path:
    """Rename `path` to a hidden sibling (`.NAME.TAG-PID`) in one step and return the new path."""
    aside = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    path.rename(aside)
    return aside


def remove(path: Path) -> None:
    """Remove a file or a folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, content: Any) -> Path:
    return write_text(path, json.dumps(content, indent=2, sort_keys=True, default=str))
