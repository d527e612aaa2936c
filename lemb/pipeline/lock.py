"""One process per stage folder: an exclusive OS file lock on `.<stage folder>.lock` beside the folder, taken
before the stage touches its folder (a `--restart`, which moves the folder aside, included) and held until it ends.

`flock` locks belong to the open file, so a holder killed with -9 releases its lock with its last descriptor; the
file itself stays (removing a lock file lets a third process lock a different file than the second one waits on).
The file holds the holder's pid, host and start time, for the refusal message. Ray workers write shards into the
folder under their driver's lock; they take none. On NFS, Linux maps `flock` onto NFS byte-range locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from lemb.errors import LembError


class StageLock:
    def __init__(self, stage_dir: Path, stage: str) -> None:
        stage_dir = Path(stage_dir)
        self.folder, self.stage = stage_dir, stage
        self.path = stage_dir.parent / f".{stage_dir.name}.lock"
        self._file: IO[str] | None = None

    def __enter__(self) -> StageLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the stage's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise LembError(
                f"{self.folder}: another `lemb {self.stage}` is running on this folder ({holder}); wait for it"
                " to end or stop it, then run this again"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
