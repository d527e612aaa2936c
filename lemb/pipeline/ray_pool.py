"""A Ray cluster to run on (the one at an address, or one of this process's own) and a pool of actors on it.

Ray itself is imported only here and only when called, so that importing lemb needs no Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from lemb.errors import LembError, MissingDependency

log = logging.getLogger(__name__)


def init_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependency("ray", "pip install 'ray[default]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        address = address or os.environ.get("RAY_ADDRESS") or None
        _check_reachable(address)
        if address is None:  # a cluster of its own, even where another local one runs
            address = "local"
            kwargs["object_store_memory"] = 256 * 1024**2  # shards travel as files; keep /dev/shm free
        # Ray turns token authentication on for a cluster it starts (a token made once in ~/.ray) and warns that it
        # did, on every start: nothing the user has to act on, and not what --quiet should print. Its errors stay.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, **kwargs)
        if threading.current_thread() is threading.main_thread() and callable(handler):
            signal.signal(signal.SIGTERM, handler)  # ray.init replaces it with sys.exit(15): the CLI's stops cleanly
    return ray


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A `host:port` Ray address that does not accept a connection is one line, not Ray's minutes of retries."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise LembError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
            f"`ray start --head` or check --address"
        ) from None


class ActorPool:
    """Ray actors of one stage (one model copy each), each made by `start`. A shard goes only to an actor that has
    started (its setup done): after a node is lost, the replacement of its actor may wait for resources the cluster
    no longer has, while the actors still alive take the queue. Actors are owned by the driver: they die with it.

    Used as a context manager: leaving it kills every actor it holds, whatever they were doing. `name` (the
    stage's) starts its messages; `max_retries` plus `size` actors may die before they start."""

    def __init__(self, ray: Any, start: Callable[[], Any], size: int, name: str, max_retries: int) -> None:
        from ray.exceptions import ActorDiedError, NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError

        self.ray, self.start, self.name = ray, start, name
        self.max_start_failures = max_retries + size
        self.start_failures = 0
        self.infrastructure = (ActorDiedError, RayActorError, NodeDiedError, OutOfMemoryError, WorkerCrashedError)
        self.starting: dict[Any, Any] = {}  # ready-ref -> actor whose setup is under way (or waits for resources)
        self.idle: list[Any] = []
        self.running: dict[Any, tuple[int, Any]] = {}  # task ref -> (shard, actor)
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        actor = self.start()
        self.starting[actor.__ray_ready__.remote()] = actor

    def submit(self, index: int, out: str, source: str, items: int) -> None:
        actor = self.idle.pop()
        self.running[actor.run.remote(out, index, source, items)] = (index, actor)

    def wait(self) -> Any:
        ready, _ = self.ray.wait([*self.running, *self.starting], num_returns=1)
        return ready[0]

    def started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            self.ray.get(ref)
        except self.infrastructure as exc:
            if getattr(exc, "actor_init_failed", False):  # the stage's setup raised: every worker would
                raise LembError(f"{self.name}: worker setup failed: {_last_line(exc)}") from None
            self.start_failures += 1  # its process or its node went away before it was ready
            if self.start_failures > self.max_start_failures:
                raise LembError(f"{self.name}: workers keep dying before they start: {_last_line(exc)}") from None
            log.warning("a worker died before it started (%s); starting another", type(exc).__name__)
            self.replace(actor)
            return
        self.idle.append(actor)

    def replace(self, actor: Any) -> None:
        self.ray.kill(actor)
        self._start()

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        for actor in [*self.idle, *self.starting.values(), *(a for _, a in self.running.values())]:
            self.ray.kill(actor)
        self.idle, self.starting, self.running = [], {}, {}


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
