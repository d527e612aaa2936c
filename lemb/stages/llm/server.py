"""The server backend: the LLM as OpenAI-compatible servers already run it (vLLM's `vllm serve`), over HTTP.

What is sent: token ids. lemb renders every prompt (its templates, the model's chat template) and tokenizes it and
each continuation here, with the served model's tokenizer and the shared `Prompts` of every backend, and sends the ids
as the request's `prompt`: the server neither renders nor tokenizes again, so all three backends sample after and
score the same tokens, across the same prompt / continuation boundary.

The backend composes `Prompts`, `ServerSampler` (server_sampler.py) and `ServerScorer` (server_scorer.py), both
sending their requests through one `ServerClient` (server_client.py: concurrency, retries, servers set aside). This
module connects to the servers first (`connect`): every one must serve the same model and tokenize as lemb does.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from typing import Any

from lemb.errors import ConfigError
from lemb.pipeline.config import LLMServer
from lemb.stages.llm.base import LLMBackend, forwarded
from lemb.stages.llm.server_client import ServerClient, auth_headers, error_message, public_url
from lemb.stages.llm.server_sampler import ServerSampler
from lemb.stages.llm.server_scorer import ServerScorer

__all__ = ["ServedModel", "ServerBackend", "connect", "public_url"]

log = logging.getLogger(__name__)

PROBE = 'Who wrote "Hamlet"?\n\tÜnïcödé – 42 ½ 漢字'  # tokenized here and by the server: the tokenizers must agree


def _get_json(url: str, api_key_env: str, payload: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """One blocking request (the driver's checks): the JSON body, or ConfigError with one line."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                              **auth_headers(api_key_env)})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = error_message(exc.read().decode(errors="replace"))
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


class ServerBackend(LLMBackend):
    """The LLMBackend interface over OpenAI-compatible servers of one model (see the module's notes)."""

    prefilled_tokens = forwarded("client", "prefilled_tokens")  # prompt tokens the servers reported

    def __init__(self, served: ServedModel, server: LLMServer, trust_remote_code: bool = False) -> None:
        self.served, self.settings = served, server
        self._open(served.id, served.tokenizer, trust_remote_code, revision=served.revision)
        self.client = ServerClient(served, server)
        self.sampler = ServerSampler(self.client, self.prompts)
        self.scorer = ServerScorer(self.client)
        # connections closed when the backend is collected, or before the interpreter goes
        self.close = weakref.finalize(self, self.client.close)
