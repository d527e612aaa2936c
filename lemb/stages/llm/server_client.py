"""Requests to OpenAI-compatible servers of one model, shared by the server backend's sampler and scorer.

Kept full: a client's calls run on an asyncio loop of its own (a daemon thread), with up to `max_concurrency`
requests in flight, each sent to the server with the fewest in flight. The client is aiohttp: the asyncio client of
vLLM's own serving benchmarks, with a connection pool that takes hundreds of concurrent requests and nothing between
lemb and the JSON (the `openai` client validates every response into its own types, where vLLM's extra fields are
untyped, and retries by its own rules, which lemb's fault handling below would have to undo).

Faults: connection errors, timeouts, 408, 429 and 5xx are retried (`request_retries` times, backoff 0.5 s doubling
up to 30 s); a server that fails 3 requests in a row is set aside for 30 s while the others take its requests. Any
other status (400: a prompt over the served context; 401: a wrong API key; 404: a model not served) can never
succeed: `RequestRefused` names the request and carries the server's message. A server is checked to serve the same
model (`ServedModel`) before the first request a client sends it, so two models never share one run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Sequence
from typing import Any

from lemb.errors import ConfigError
from lemb.pipeline.config import LLMServer
from lemb.stages.llm.base import Progress, RequestRefused

log = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds
SET_ASIDE_AFTER, SET_ASIDE_SECONDS = 3, 30.0  # consecutive failures of one server, and for how long it rests
CONNECT_TIMEOUT = 30.0  # seconds to open a connection (a request's whole time is `request_timeout`)


def public_url(url: str) -> str:
    """`url` without user:password, for messages and metadata."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def error_message(body: str) -> str:
    """The server's own message from an error response (vLLM: {"error": {"message": ...}} or {"message": ...})."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "(empty response)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if data.get("message"):
            return str(data["message"])
        if isinstance(error, str):
            return error
    return body.strip()[:500]


def auth_headers(api_key_env: str) -> dict[str, str]:
    key = os.environ.get(api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


class _Servers:
    """Which server takes the next request: the one with the fewest in flight among those not set aside, each
    checked to serve the run's model before its first request."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.in_flight = dict.fromkeys(self.urls, 0)
        self.failures = dict.fromkeys(self.urls, 0)
        self.aside_until = dict.fromkeys(self.urls, 0.0)
        self.checked: set[str] = set()

    def pick(self) -> str:
        now = time.monotonic()
        ready = [u for u in self.urls if self.aside_until[u] <= now]
        if not ready:  # all resting: the one back soonest (the request's backoff waits meanwhile)
            return min(self.urls, key=self.aside_until.__getitem__)
        return min(ready, key=self.in_flight.__getitem__)

    def failed(self, url: str, problem: str) -> None:
        self.failures[url] += 1
        if self.failures[url] == SET_ASIDE_AFTER:
            log.warning("%s: %d requests failed in a row (last: %s); set aside for %.0f s", public_url(url),
                        SET_ASIDE_AFTER, problem, SET_ASIDE_SECONDS)  # fmt: skip
        if self.failures[url] >= SET_ASIDE_AFTER:
            self.aside_until[url] = time.monotonic() + SET_ASIDE_SECONDS

    def succeeded(self, url: str) -> None:
        self.failures[url] = 0

    def drop(self, url: str, why: str) -> None:
        if len(self.urls) == 1:
            raise ConfigError(f"{public_url(url)}: {why}")
        log.warning("%s: %s; not used again by this worker", public_url(url), why)
        self.urls.remove(url)


class ServerClient:
    """Completion requests for the model `served` (a `ServedModel`) to the servers `settings` names, from a loop on
    the client's own thread: `call` blocks on a coroutine there; `close` ends the session and the thread."""

    def __init__(self, served: Any, settings: LLMServer) -> None:
        self.served, self.settings = served, settings
        self.servers = _Servers(settings.urls)
        self.prefilled_tokens = 0  # prompt tokens the servers reported (benchmarks, cost reports)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lemb-llm-client", daemon=True)
        self.thread.start()
        self.session: Any = None  # opened on the loop, by the first `gather`
        self.slots = asyncio.Semaphore(settings.max_concurrency)

    def call(self, work: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    async def gather(self, jobs: list[Awaitable[Any]], weights: list[float], progress: Progress | None) -> list[Any]:
        """All jobs at once (at most `max_concurrency` requests in flight), in order; the first failure cancels the
        rest. `progress` is told the weighted fraction finished."""
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout, connect=CONNECT_TIMEOUT),
            )
        total, done = sum(weights) or 1.0, 0.0

        async def tracked(job: Awaitable[Any], weight: float) -> Any:
            nonlocal done
            out = await job
            done += weight
            if progress:
                progress(done / total)
            return out

        tasks = [asyncio.ensure_future(tracked(j, w)) for j, w in zip(jobs, weights)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _check_server(self, url: str) -> None:
        """The server serves the run's model (checked once, before the first request it gets)."""
        if url in self.servers.checked:
            return
        async with self.session.get(f"{url}/models", headers=auth_headers(self.settings.api_key_env)) as response:
            if response.status != 200:
                raise _Transient(f"HTTP {response.status} listing models")
            listed = (await response.json()).get("data") or []
        if not any((e.get("id"), e.get("root")) == (self.served.id, self.served.root) for e in listed):
            served = ", ".join(repr(e.get("id")) for e in listed) or "nothing"
            self.servers.drop(url, f"serves {served}, not the run's {self.served.id!r} ({self.served.root})")
            raise _Transient("another model")
        self.servers.checked.add(url)

    async def post(self, payload: dict[str, Any], index: int) -> dict[str, Any]:
        """One completion request, retried through transient faults; RequestRefused if it can never succeed."""
        import aiohttp

        s = self.settings
        body = {"model": self.served.id, **payload}
        async with self.slots:
            for attempt in range(s.request_retries + 1):
                url = self.servers.pick()
                self.servers.in_flight[url] += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt) * (0.75 + 0.5 * random.random())
                try:
                    await self._check_server(url)
                    async with self.session.post(f"{url}/completions", json=body,
                                                 headers=auth_headers(s.api_key_env)) as response:  # fmt: skip
                        if response.status == 200:
                            reply = await response.json()
                            self.servers.succeeded(url)
                            return reply
                        message = error_message(await response.text())
                        if response.status not in RETRIED_STATUS:
                            if response.status == 401:
                                message += f" (the API key is read from ${s.api_key_env})"
                            raise RequestRefused(index, f"{public_url(url)} refused the request "
                                                        f"(HTTP {response.status}): {message}")  # fmt: skip
                        problem = f"HTTP {response.status}: {message}"
                        after = response.headers.get("Retry-After", "")
                        if after.replace(".", "", 1).isdigit():
                            wait = min(BACKOFF_MAX, float(after))
                except (aiohttp.ClientError, asyncio.TimeoutError, _Transient) as exc:
                    problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                finally:
                    self.servers.in_flight[url] -= 1
                self.servers.failed(url, problem)
                if attempt == s.request_retries:
                    break
                await asyncio.sleep(wait)
        raise ServerUnavailable(f"{public_url(url)}: request failed {s.request_retries + 1} times (last: {problem})")

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        if self.session is not None:
            asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(timeout=10)
            self.session = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Transient(Exception):
    """A fault of one server at one moment (retried like a connection error)."""


class ServerUnavailable(RuntimeError):
    """A request that failed through all its retries: the shard fails, and a rerun of the stage does it again."""
