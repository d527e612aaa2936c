"""One process per stage folder: an exclusive OS file lock on `.<stage folder>.lock` beside the folder, taken
before the stage creates, moves or removes any file of its own (a `--restart`, which moves the folder aside,
included) and held until it ends. A process refused by the lock has touched nothing.

`flock` locks belong to the open file, so a holder killed with -9 releases its lock with its last descriptor. A
holder that leaves nothing behind (its stage folder absent or empty: a bad input found before any output) removes
the lock file and the folders it created, so a failed first try leaves no trace. Removing a lock file is safe
because a taker checks, once it holds the lock, that the file it locked is still the one at the path (a process
that opened the old file just before it was removed tries again on the new one). The file holds the holder's pid,
host and start time, for the refusal message. Ray workers write shards into the folder under their driver's lock;
they take none. On NFS, Linux maps `flock` onto NFS byte-range locks.
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
        self.path = lock_path(stage_dir)
        self._file: IO[str] | None = None
        self._created: list[Path] = []  # folders this holder made (removed again if they stay empty)

    def __enter__(self) -> StageLock:
        self._created = [d for d in (*reversed(self.folder.parents), self.folder) if not d.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._acquire()
            handle.seek(0)
            handle.truncate()
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
            os.write(handle.fileno(), holder.encode())  # unbuffered: a full disk fails here, not at close
        except OSError as exc:  # a read-only or full file system: one line, and nothing left behind
            if self._file is not None:
                self.__exit__()
            else:
                self._remove_created()
            problem = exc.strerror or str(exc)
            raise LembError(f"{exc.filename or self.path}: cannot take the stage lock ({problem})") from None
        return self

    def _acquire(self) -> IO[str]:
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 - held open for the stage's lifetime
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _holder(handle.read())
                handle.close()
                self._remove_created()
                raise LembError(
                    f"{self.folder}: another `lemb {self.stage}` is running on this folder ({holder}); wait for it"
                    " to end or stop it, then run this again"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._file = handle
                return handle
            handle.close()  # its holder ended and removed it meanwhile: lock the file now at the path

    def __exit__(self, *exc: Any) -> None:
        if self._file is None:
            return
        try:
            if not (self.folder.is_dir() and any(self.folder.iterdir())):
                if self.folder.is_dir():
                    self.folder.rmdir()
                self.path.unlink(missing_ok=True)  # still held: a waiting taker finds the file gone and retries
                self._remove_created()
        except OSError:
            pass  # tidying is best effort; the lock itself is released below
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def _remove_created(self) -> None:
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if still empty
            except FileNotFoundError:
                continue
            except OSError:
                return


def lock_path(stage_dir: Path) -> Path:
    return Path(stage_dir).parent / f".{Path(stage_dir).name}.lock"


def holder_of(stage_dir: Path) -> str | None:
    """Who holds a stage folder's lock ("pid 4242 on node-3, started ..."), or None when nobody does."""
    try:
        with open(lock_path(stage_dir)) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(handle.read())
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        pass
    return None


def process_gone(pid: int) -> bool:
    """Whether process `pid` of this host is known to have ended (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
