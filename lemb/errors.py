"""Errors that reach the user as one line (the CLI prints the message and exits non-zero)."""

from __future__ import annotations


class LembError(Exception):
    """A user-facing error: bad input, bad config, or a conflict with earlier output."""


class InputError(LembError):
    """Bad input data: the message names the file, the row or id, and the field."""

    def __init__(self, path: object, where: str, field: str | None, problem: str) -> None:
        location = f"{path}: {where}" + (f", field {field!r}" if field else "")
        super().__init__(f"{location}: {problem}")


class NotFound(LembError, FileNotFoundError):
    """A path the user named (a model folder, a file) does not exist: one line, and still a FileNotFoundError for
    code that catches those."""


class ConfigError(LembError):
    """Invalid settings; all problems are gathered into one message."""


class StageConflict(LembError):
    """A rerun whose config or inputs differ from the output already on disk."""


class CannotWrite(LembError):
    """The storage refused a write (a full disk, a read-only folder): the file and the system's reason."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: cannot write ({problem})")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption): the stage stops as on Ctrl-C, keeping its finished shards. A
    KeyboardInterrupt, so that no `except Exception` takes it for a shard's failure and Ray's blocking calls let
    it through as they let Ctrl-C through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class MissingDependency(LembError):
    def __init__(self, module: str, install: str, plural: bool = False) -> None:
        are, them = ("are", "them") if plural else ("is", "it")
        super().__init__(f"{module} {are} not installed; install {them} with: {install}")
