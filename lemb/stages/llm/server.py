"""The server backend: the LLM as OpenAI-compatible servers already run it (vLLM's `vllm serve`), over HTTP.

What is sent: token ids. lemb renders every prompt (its templates, the model's chat template) and tokenizes it and
each continuation here, with the served model's tokenizer and the rules of the in-process backends (LLMBackend), and
sends the ids as the request's `prompt`: the server neither renders nor tokenizes again, so all three backends
sample after and score the same tokens, across the same prompt / continuation boundary.

Sampling: one `/v1/completions` request per prompt with its `n` samples, seeded with the seed the in-process vLLM
engine gives the same prompt (`request_seed`), every sampling setting sent explicitly (a server started with
`--generation-config auto` fills whatever a request leaves unset from the model's generation_config.json: a
repetition penalty, a top-k), the generated token ids returned (`return_token_ids`, a vLLM field). Scoring: one
request per (prompt, continuation) with `prompt_logprobs: 0` and `max_tokens: 1`, which returns the log-probability
of every prompt token; the continuation's are kept. (vLLM does not read its prefix cache for such requests, so each
one computes its whole prompt; the in-process engine reads it, see vllm_engine.py.)

Kept full: a backend's calls run on an asyncio loop of its own (a daemon thread), with up to `max_concurrency`
requests in flight, each sent to the server with the fewest in flight. The client is aiohttp: the asyncio client of
vLLM's own serving benchmarks, with a connection pool that takes hundreds of concurrent requests and nothing between
lemb and the JSON (the `openai` client validates every response into its own types, where vLLM's extra fields are
untyped, and retries by its own rules, which lemb's fault handling below would have to undo).

Faults: connection errors, timeouts, 408, 429 and 5xx are retried (`request_retries` times, backoff 0.5 s doubling
up to 30 s); a server that fails 3 requests in a row is set aside for 30 s while the others take its requests. Any
other status (400: a prompt over the served context; 401: a wrong API key; 404: a model not served) can never
succeed: `RequestRefused` names the request and carries the server's message. A server is checked to serve the same
model (`ServedModel`) before the first request a backend sends it, so two models never share one run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from lemb.errors import ConfigError
from lemb.pipeline.config import LLMServer
from lemb.stages.llm.base import LLMBackend, Progress, RequestRefused, check_reduce, reduced, restart_seed
from lemb.stages.llm.vllm_engine import request_seed

log = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds
SET_ASIDE_AFTER, SET_ASIDE_SECONDS = 3, 30.0  # consecutive failures of one server, and for how long it rests
CONNECT_TIMEOUT = 30.0  # seconds to open a connection (a request's whole time is `request_timeout`)
PROBE = 'Who wrote "Hamlet"?\n\tÜnïcödé – 42 ½ 漢字'  # tokenized here and by the server: the tokenizers must agree


def public_url(url: str) -> str:
    """`url` without user:password, for messages and metadata."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _error_message(body: str) -> str:
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


def _headers(api_key_env: str) -> dict[str, str]:
    key = os.environ.get(api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get_json(url: str, api_key_env: str, payload: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """One blocking request (the driver's checks): the JSON body, or ConfigError with one line."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                              **_headers(api_key_env)})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = _error_message(exc.read().decode(errors="replace"))
        if exc.code == 401:
            message += f" (the API key is read from ${api_key_env})"
        raise ConfigError(f"{public_url(url)}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"{public_url(url)}: cannot reach the LLM server ({reason})") from None


@dataclass(frozen=True)
class ServedModel:
    """What a run labels with: the served model (its name and path as the servers report them) and the tokenizer lemb
    renders with (`revision`: its fingerprint, as the in-process backends fingerprint a model folder)."""

    id: str
    root: str
    tokenizer: str
    revision: str

    def identity(self) -> dict[str, str]:
        """Hashed into the stage's config hash and written into every shard: rewards of two models never mix."""
        return {"served_model": self.id, "served_root": self.root, "tokenizer_revision": self.revision}


def _matches(entry: dict[str, Any], names: set[str]) -> bool:
    return entry.get("id") in names or entry.get("root") in names


def _load_tokenizer(candidates: list[str], trust_remote_code: bool) -> tuple[str, Any]:
    from transformers import AutoTokenizer

    tried = []
    for name in dict.fromkeys(c for c in candidates if c):
        try:
            return name, AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            tried.append(f"{name} ({str(exc).splitlines()[0][:120]})")
    raise ConfigError(
        "the server backend renders and tokenizes here and found no tokenizer of the served model; tried "
        + "; ".join(tried)
        + ". Pass --tokenizer with a local folder or hub id of the model's tokenizer"
    )


def connect(server: LLMServer, llm: str, trust_remote_code: bool = False) -> ServedModel:
    """The model `llm` as the servers at `server.urls` serve it, checked: every reachable server serves it (by its
    name or path, as `/v1/models` lists them; unreachable ones are warned about, at least one must answer) and
    tokenizes as the tokenizer lemb loads here does (vLLM's `/tokenize`, where the server has it)."""
    from lemb.stages.models import model_fingerprint, resolve_model_path

    names = {llm}
    try:
        local = resolve_model_path(llm, "LLM")
        names |= {local, os.path.realpath(local)} if os.path.exists(local) else set()
    except (FileNotFoundError, ImportError):
        local = None
    found: dict[str, dict[str, Any]] = {}
    unreachable = []
    for url in server.urls:
        try:
            listed = _get_json(f"{url}/models", server.api_key_env).get("data") or []
        except ConfigError as exc:
            if "HTTP 404" in str(exc) and not url.endswith("/v1"):
                raise ConfigError(f"{exc}; the base URL of vLLM's OpenAI API ends in /v1: {url}/v1?") from None
            if "cannot reach" not in str(exc):
                raise
            unreachable.append(str(exc))
            continue
        match = [e for e in listed if _matches(e, names)]
        if not match:
            served = ", ".join(repr(e.get("id")) for e in listed) or "nothing"
            raise ConfigError(f"{public_url(url)} serves {served}, not {llm!r}: pass --llm with the served name")
        found[url] = match[0]
    if not found:
        raise ConfigError("; ".join(unreachable))
    for problem in unreachable:
        log.warning("%s; labelling with the other servers, and with it once it answers", problem)
    first = next(iter(found.values()))
    for url, entry in found.items():
        if (entry.get("id"), entry.get("root")) != (first.get("id"), first.get("root")):
            raise ConfigError(f"{public_url(url)} serves {entry.get('root')!r} as {entry.get('id')!r}, the other "
                              f"servers {first.get('root')!r} as {first.get('id')!r}: one model per run")  # fmt: skip
    root = str(first.get("root") or first["id"])
    candidates = [server.tokenizer] if server.tokenizer else [local, root if os.path.exists(root) else None, llm]
    path, tokenizer = _load_tokenizer([c for c in candidates if c], trust_remote_code)
    served = ServedModel(id=str(first["id"]), root=root, tokenizer=path, revision=model_fingerprint(path))
    _check_tokenizer(served, tokenizer, next(iter(found)), server.api_key_env)
    return served


def _check_tokenizer(served: ServedModel, tokenizer: Any, url: str, api_key_env: str) -> None:
    """The server's tokens of PROBE must be lemb's (vLLM's `/tokenize`, beside `/v1`; skipped where it is absent)."""
    root_url = url[: -len("/v1")] if url.endswith("/v1") else url
    try:
        reply = _get_json(f"{root_url}/tokenize", api_key_env,
                          {"model": served.id, "prompt": PROBE, "add_special_tokens": False})  # fmt: skip
    except ConfigError:
        log.info("%s has no /tokenize: the tokenizer %s is not checked against it", public_url(url), served.tokenizer)
        return
    ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if reply.get("tokens") != ours:
        raise ConfigError(f"the tokenizer {served.tokenizer} does not tokenize as {served.id!r} at {public_url(url)} "
                          f"does: pass --tokenizer with the served model's own")  # fmt: skip


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


class ServerBackend(LLMBackend):
    """The LLMBackend interface over OpenAI-compatible servers of one model (see the module's notes)."""

    def __init__(self, served: ServedModel, server: LLMServer, trust_remote_code: bool = False) -> None:
        self.served, self.settings = served, server
        self._open(served.id, served.tokenizer, trust_remote_code, revision=served.revision)
        self.prefilled_tokens = 0  # prompt tokens the servers reported (benchmarks, cost reports)
        self.servers = _Servers(server.urls)
        self._client = _Client()
        # connections closed when the backend is collected, or before the interpreter goes
        self.close = weakref.finalize(self, self._client.close)

    # -- the event loop: one per backend, on its own thread; the public methods block on it ---------------------

    def _call(self, work: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._client.loop).result()

    async def _gather(self, jobs: list[Awaitable[Any]], weights: list[float], progress: Progress | None) -> list[Any]:
        """All jobs at once (at most `max_concurrency` requests in flight), in order; the first failure cancels the
        rest. `progress` is told the weighted fraction finished."""
        import aiohttp

        if self._client.session is None:
            self._client.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout, connect=CONNECT_TIMEOUT),
            )
            self._slots = asyncio.Semaphore(self.settings.max_concurrency)
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
        async with self._client.session.get(f"{url}/models", headers=_headers(self.settings.api_key_env)) as response:
            if response.status != 200:
                raise _Transient(f"HTTP {response.status} listing models")
            listed = (await response.json()).get("data") or []
        if not any((e.get("id"), e.get("root")) == (self.served.id, self.served.root) for e in listed):
            served = ", ".join(repr(e.get("id")) for e in listed) or "nothing"
            self.servers.drop(url, f"serves {served}, not the run's {self.served.id!r} ({self.served.root})")
            raise _Transient("another model")
        self.servers.checked.add(url)

    async def _post(self, payload: dict[str, Any], index: int) -> dict[str, Any]:
        """One completion request, retried through transient faults; RequestRefused if it can never succeed."""
        import aiohttp

        s = self.settings
        body = {"model": self.served.id, **payload}
        async with self._slots:
            for attempt in range(s.request_retries + 1):
                url = self.servers.pick()
                self.servers.in_flight[url] += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt) * (0.75 + 0.5 * random.random())
                try:
                    await self._check_server(url)
                    async with self._client.session.post(f"{url}/completions", json=body,
                                                  headers=_headers(s.api_key_env)) as response:  # fmt: skip
                        if response.status == 200:
                            reply = await response.json()
                            self.servers.succeeded(url)
                            return reply
                        message = _error_message(await response.text())
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

    # -- the LLMBackend interface -----------------------------------------------------------------------------------

    @staticmethod
    def _sampling(temperature: float, max_tokens: int) -> dict[str, Any]:
        """Every setting that shapes a sample, explicit (what the in-process engine's SamplingParams say)."""
        return {
            "temperature": temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": max_tokens, "stop": ["\n"],
            "return_token_ids": True, "skip_special_tokens": True,
        }  # fmt: skip

    async def _complete(
        self, index: int, prompt: list[int], n: int, seed: int | None, temperature: float, max_new_tokens: int
    ) -> list[list[int]]:
        """Generated token ids of a prompt's n samples, a sample that stopped blank continued (`stopped_blank`)."""
        extra = {} if seed is None else {"seed": seed}
        reply = await self._post({"prompt": prompt, "n": n, **extra, **self._sampling(temperature, max_new_tokens)},
                                 index)  # fmt: skip
        self.prefilled_tokens += reply.get("usage", {}).get("prompt_tokens", 0)
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        rows = []
        for j, choice in enumerate(choices):
            row = self._token_ids(choice)
            while self.stopped_blank(row, choice.get("finish_reason"), choice.get("stop_reason"), max_new_tokens):
                again = {"prompt": prompt + row, "n": 1, **self._sampling(temperature, max_new_tokens - len(row))}
                if seed is not None:
                    again["seed"] = restart_seed(seed, j, len(row))
                choice = (await self._post(again, index))["choices"][0]
                row += self._token_ids(choice)
            rows.append(row)
        return rows

    @staticmethod
    def _token_ids(choice: dict[str, Any]) -> list[int]:
        ids = choice.get("token_ids")
        if ids is None:
            raise ConfigError("the LLM server returned no token ids: the server backend needs vLLM's OpenAI-compatible"
                              " server (its return_token_ids field)")  # fmt: skip
        return list(ids)

    def sample_many(
        self,
        user_messages: Sequence[str],
        ns: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        seeds: Sequence[int],
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        """ns[i] samples of each prompt i: one request per prompt, seeded with request_seed(seeds[i]) as the
        in-process vLLM engine seeds it, so a prompt's samples do not depend on the call (`batch_tokens` unused)."""
        self._check_sampling(user_messages, ns, seeds)
        asked = [i for i, n in enumerate(ns) if n > 0]
        jobs = [
            self._complete(i, self._encode_prompt(user_messages[i]), ns[i], request_seed(seeds[i]), temperature,
                           max_new_tokens)
            for i in asked
        ]  # fmt: skip
        rows = self._call(self._gather(jobs, [float(ns[i]) for i in asked], progress))
        out: list[list[str]] = [[] for _ in user_messages]
        for i, samples in zip(asked, rows):
            out[i] = self._texts(samples)
        return out

    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        jobs = [self._complete(i, self._encode_prompt(m), 1, None, 0.0, max_new_tokens)
                for i, m in enumerate(user_messages)]  # fmt: skip
        rows = self._call(self._gather(jobs, [1.0] * len(jobs), None))
        return [self._texts(r)[0] for r in rows]

    async def _score(self, index: int, prompt: list[int], continuation: list[int]) -> float:
        """Sum of the continuation's token log-probabilities after the prompt."""
        reply = await self._post(
            {"prompt": prompt + continuation, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}, index
        )
        self.prefilled_tokens += reply.get("usage", {}).get("prompt_tokens", 0)
        rows = reply["choices"][0].get("prompt_logprobs")
        if rows is None:
            raise ConfigError("the LLM server returned no prompt_logprobs: the server backend needs vLLM's "
                              "OpenAI-compatible server")  # fmt: skip
        return sum(float(row[str(token)]["logprob"]) for row, token in zip(rows[len(prompt) :], continuation,
                                                                             strict=True))  # fmt: skip

    def score_many(
        self,
        items: Sequence[tuple[str, list[str]]],
        reduce: str = "mean",
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[tuple[float, int]]]:
        """score() of every (prompt, continuation) pair: one request each, all in flight together (`batch_tokens`
        unused). An error names the item's index."""
        check_reduce(reduce)
        prompts = [self._encode_prompt(message) for message, _ in items]
        conts = [self._encode_continuations(c) for _, c in items]
        pairs = [(i, c) for i, cs in enumerate(conts) for c in cs]
        totals = self._call(
            self._gather([self._score(i, prompts[i], c) for i, c in pairs], [float(len(c)) for _, c in pairs],
                         progress)
        )  # fmt: skip
        results: list[list[tuple[float, int]]] = [[] for _ in items]
        for (i, cont), total in zip(pairs, totals):
            results[i].append(reduced(total, len(cont), reduce))
        return results


class _Client:
    """A backend's event loop (on a daemon thread) and its HTTP session, closed apart from the backend."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lemb-llm-client", daemon=True)
        self.thread.start()
        self.session: Any = None

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
