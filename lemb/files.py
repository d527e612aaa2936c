"""Atomic writes: every file or folder lemb writes appears complete under its final name or not at all.

`atomic(final)` yields a temporary path beside `final` (same file system, hidden, named after the writing
process); the caller writes a file or a folder there; on success it is renamed over `final` in one step, on any
error it is removed. A reader never sees a half-written file, and a process killed midway leaves only a
`.NAME.tmp-PID` that the next run of its stage removes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic(final: str | Path) -> Iterator[Path]:
    """A temporary path to write `final` at; renamed into place when the block ends without an error. A folder
    replaces only a missing or empty `final` folder (use `move_aside` on an old one first)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        remove(tmp)


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
