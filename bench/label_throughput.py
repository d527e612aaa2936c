"""Reward-labelling throughput: naive transformers scoring vs lemb's transformers and vLLM backends.

The workload (the label stage's scoring): NQ questions from ../shared/data/knowledge_qa/nq_oracle (or --data), each
with its gold passage and 3 other passages as candidates in the knowledge-QA prompt; the desired output (the first
answer) and a pool of N = 8 samples of the bare prompt, all scored under every candidate's prompt. The pool is drawn
once (transformers sampler, fixed seed) so every variant scores the same continuations. Variants, in one process,
one after another, one thread:

  naive         every prompt + continuation its own sequence, batched (TransformersBackend.score_naive)
  transformers  lemb's transformers backend: one packed row per prompt (the prompt once, then its continuations,
                each masked to see only the prompt and itself), the prompts' common prefix cached once per call
  vllm          lemb's vLLM backend: all of a query's requests in one engine call, prompts read from the prefix cache

Reported per variant: (query, candidate) pairs scored per second; LLM tokens processed per second (naive: prompt +
continuation per sequence; transformers: the tokens of its packed rows and shared prefix; vLLM: the tokens the engine
computed, cache hits excluded); peak RSS while it ran; speedup over naive; flops_fraction: the workload's necessary
FLOPs (the transformer body over each prompt once and every continuation token, the vocabulary projection for
continuation tokens) per second, as a fraction of a dense matmul (the best of runs between the variants, same threads).
max_abs_logprob_diff: the largest difference of a sequence's summed log-probability between any two variants.
vllm_forced_decode_lower_bound: what scoring by forced-token generation would cost at least (see the function);
with --vllm-no-cache, vllm_prompt_logprobs_without_cache: vLLM's default (every request re-runs its prompt).

With --server, the label stage through lemb's server backend against the same LLM served by vLLM's OpenAI-compatible
server (started here on a free port, or --server-url), in one run: (a) lemb's in-process vLLM backend on the same
candidates, (b) lemb's server backend at each --concurrency, (c) the ceiling: the very requests lemb sent (recorded)
fired again at the same server by a bare asyncio + aiohttp loop with the same number in flight, sampling requests
first. The server's prefix cache is emptied before each variant (its dev-mode /reset_prefix_cache). Reported:
(query, candidate) pairs per second and LLM tokens per second (prompt + generated tokens as the server counts them).

    python bench/label_throughput.py [--quick] [--json OUT]
    python bench/label_throughput.py --server --queries 8 --concurrency 4,16,64 [--json OUT]
    python bench/label_throughput.py --llm Qwen/Qwen2.5-1.5B-Instruct --dtype bfloat16 --queries 64   # one GPU

`--random-init` builds the LLM's architecture from the config.json in --llm with fresh weights (saved once to a
temporary folder with the tokenizer): throughput does not depend on the weights, so a folder with only the config
and the tokenizer files stands in for a model that cannot be downloaded. Its samples are random tokens.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import threading
import time
from pathlib import Path
from typing import Any

import psutil

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "knowledge_qa" / "nq_oracle"


def make_workload(data: Path, n_queries: int, n_candidates: int, seed: int = 0) -> list[dict[str, Any]]:
    from lemb.data.tasks import build_prompt

    corpus = {r["id"]: r["text"] for r in map(json.loads, (data / "corpus.jsonl").read_text().splitlines())}
    ids = sorted(corpus)
    rng = random.Random(seed)
    queries = [q for q in map(json.loads, (data / "queries.jsonl").read_text().splitlines()) if q["answers"]]
    work = []
    for q in queries[:n_queries]:
        others = rng.sample([i for i in ids if i not in q["positive_ids"]], n_candidates - 1)
        passages = [corpus[q["positive_ids"][0]]] + [corpus[i] for i in others]
        work.append({
            "bare": build_prompt("qa", q["question"], None),
            "prompts": [build_prompt("qa", q["question"], p) for p in passages],
            "target": q["answers"][0],
            "question": q["question"], "passages": passages, "ids": [q["positive_ids"][0], *others],
            "query_id": str(q["id"]),
        })  # fmt: skip
    return work


class PeakRSS:
    """Highest resident set size of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRSS:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def matmul_flops(device: str, dtype: str, seconds: float = 3.0) -> float:
    """FLOP/s of a dense square matmul: the machine's practical limit for this precision."""
    import torch

    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    (a @ b).sum().item()  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        (a @ b).sum().item()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def model_shape(path: str) -> tuple[int, int]:
    """(transformer body parameters, vocabulary x hidden) of a model folder or hub id."""
    from transformers import AutoConfig

    from lemb.stages.label_plan import param_count

    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "text_config", config)
    head = config.vocab_size * config.hidden_size
    total = param_count(path)
    if total is None:  # not a local safetensors folder: the architecture's count
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            total = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tied = getattr(config, "tie_word_embeddings", False)
    return total - (head if tied else 2 * head), head


def random_init_llm(path: str, dtype: str) -> str:
    """A copy of the architecture at `path` with fresh weights, saved once under /tmp."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(f"/tmp/lemb-bench-llm-{Path(path).name}-{dtype}")
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


def naive_scores(llm: Any, items: list[tuple[str, list[str]]]) -> list[list[tuple[float, int]]]:
    return [llm.score_naive(message, continuations) for message, continuations in items]


def run_variant(name: str, score: Any, work: list[dict[str, Any]], pools: list[list[str]]) -> dict[str, Any]:
    """Score every query's continuations under each candidate prompt with `score(items) -> per-item scores`."""
    print(f"{name}: scoring", flush=True)
    scores = []
    with PeakRSS() as rss:
        start = time.perf_counter()
        for w, pool in zip(work, pools):
            scores += score([(p, [w["target"], *pool]) for p in w["prompts"]])
        seconds = time.perf_counter() - start
    pairs = sum(len(w["prompts"]) for w in work)
    print(f"{name}: {pairs} pairs in {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "pairs": pairs, "peak_rss_mb": rss.peak / 2**20, "scores": scores}


def forced_decode_bound(engine: Any, work: list[dict[str, Any]], pools: list[list[str]]) -> dict[str, float]:
    """A lower bound on scoring by forced-token generation (a logits processor that admits only the continuation's
    next token): the same requests, prompts read from the prefix cache, decoding as many tokens as each continuation
    has, unconstrained. It needs one engine step per continuation token where prompt_logprobs needs one prefill."""
    pairs, start = 0, time.perf_counter()
    for w, pool in zip(work, pools):
        conts = engine._encode_continuations([w["target"], *pool])
        prompts = [engine._encode_prompt(p) for p in w["prompts"]]
        engine._run(prompts, engine.SamplingParams(max_tokens=1, detokenize=False))  # cache the prompts
        params = [
            engine.SamplingParams(max_tokens=len(c), min_tokens=len(c), ignore_eos=True, temperature=0.0, logprobs=0,
                                  detokenize=False)
            for _ in prompts for c in conts
        ]  # fmt: skip
        engine._run([p for p in prompts for _ in conts], params)
        pairs += len(prompts)
    seconds = time.perf_counter() - start
    return {"pairs_per_s": pairs / seconds, "seconds": seconds}


def candidate_table(work: list[dict[str, Any]]) -> Any:
    """The workload as the label stage's input: one candidate shard (schemas.CANDIDATE rows)."""
    import pyarrow as pa

    from lemb.data import schemas

    rows = [
        {"query_id": w["query_id"], "task": "qa", "key_id": k, "retrieval_rank": j + 1, "retrieval_score": 0.0,
         "query_text": w["question"], "target": w["target"], "positive_ids": [w["ids"][0]], "key_text": p,
         "key_title": None}
        for w in work for j, (k, p) in enumerate(zip(w["ids"], w["passages"]))
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schemas.CANDIDATE)


def stage_throughput(args: argparse.Namespace, llm_name: str, work: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole label stage (sampling + scoring) on the workload, each query in its own block vs blocks of
    `block_tokens`, for each backend, in one process. flops_fraction: necessary FLOPs (the body over each distinct
    prompt once, every sampled token and every scored continuation token; the vocabulary projection for sampled and
    scored tokens) per second over the best dense-matmul rate measured between the variants."""
    import polars as pl

    from lemb.pipeline.config import LabelConfig, load_config
    from lemb.stages.label import LabelStage

    table = candidate_table(work)
    warm = candidate_table(work[:1])
    body, head = model_shape(llm_name)
    out: dict[str, Any] = {"variants": {}}
    peaks = [matmul_flops("cpu" if args.dtype == "float32" else "cuda", args.dtype)]
    labels: dict[str, Any] = {}
    for backend in args.stage_backends.split(","):
        config = load_config(LabelConfig, backend=backend, llm=llm_name, dtype=args.dtype, n_samples=args.samples,
                             per_candidate_samples=args.per_candidate, executor="local")  # fmt: skip
        stage = LabelStage(config)
        start = time.perf_counter()
        stage.setup()
        setup = time.perf_counter() - start
        default_block = stage.block_tokens
        stage.process(warm)  # first-call warm-up, not timed
        blocks = [int(b) for b in args.block_tokens.split(",")] if args.block_tokens else [default_block]
        modes = [("per_query", 1), ("batched", blocks[0])] + [(f"block_{b}", b) for b in blocks[1:]]
        for mode, block in modes:
            stage.block_tokens = block
            stage.counters.clear()
            if hasattr(stage.llm, "engine"):
                # every variant labels the same queries: an earlier variant's cached KV blocks (its prompts, the
                # continuations it scored) would serve the next one, which a real run never sees
                stage.llm.engine.reset_prefix_cache()
                stage.llm.rescored_requests = 0
            print(f"stage {backend} {mode}: labelling {len(work)} queries", flush=True)
            start = time.perf_counter()
            result = stage.process(table)
            seconds = time.perf_counter() - start
            c = stage.counters
            prompts = sum(len(w["prompts"]) + 1 for w in work)
            prompt_tokens = sum(stage.llm.prompt_lengths([w["bare"], *w["prompts"]])[i]
                                for w in work for i in range(len(w["prompts"]) + 1))  # fmt: skip
            tokens = c["sampled_tokens"] + c["continuation_tokens"]
            useful = 2 * body * (prompt_tokens + tokens) + 2 * head * tokens
            peaks.append(matmul_flops("cpu" if args.dtype == "float32" else "cuda", args.dtype))
            out["variants"][f"{backend}_{mode}"] = {
                "queries_per_s": len(work) / seconds, "seconds": seconds, "block_tokens": block,
                "backend_seconds": c["sample_seconds"] + c["score_seconds"], "sample_seconds": c["sample_seconds"],
                "score_seconds": c["score_seconds"], "prompts": prompts, "prompt_tokens": prompt_tokens,
                "sampled_tokens": c["sampled_tokens"], "scored_tokens": c["continuation_tokens"],
                "useful_flops": useful, "setup_seconds": setup,
                "rescored_requests": getattr(stage.llm, "rescored_requests", None),
            }  # fmt: skip
            labels[f"{backend}_{mode}"] = pl.from_arrow(result).sort(["query_id", "retrieval_rank"])
        del stage
        gc.collect()
    peak = max(peaks)
    for v in out["variants"].values():
        v["flops_fraction"] = v["useful_flops"] / v["seconds"] / peak
    for backend in args.stage_backends.split(","):
        a, b = labels[f"{backend}_per_query"], labels[f"{backend}_batched"]
        pools = [(x, y) for x, y in zip(a["samples"].to_list(), b["samples"].to_list()) if x is not None]
        same = [x == y for x, y in pools]
        diffs = [abs(x - y) for (x, y), eq in zip(zip(a["target_logprob"], b["target_logprob"]), same) if eq]
        out[f"{backend}_batched_vs_per_query"] = {
            "speedup": out["variants"][f"{backend}_per_query"]["seconds"]
            / out["variants"][f"{backend}_batched"]["seconds"],
            "queries_with_equal_pools": sum(same) / max(1, len(same)),
            "max_target_logprob_diff_where_pools_equal": max(diffs, default=None),
        }
    out["matmul_flops_per_s"] = peak
    return out


def server_throughput(args: argparse.Namespace, llm_name: str, work: list[dict[str, Any]]) -> dict[str, Any]:
    """The label stage through the server backend vs the in-process vLLM backend vs a bare client (module notes)."""
    import asyncio
    import sys
    import tempfile
    import urllib.request

    import aiohttp

    from lemb.pipeline.config import LabelConfig, load_config
    from lemb.stages.label import LabelStage, served_model
    from lemb.stages.llm.server_client import ServerClient

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.llm_server import VLLMServer

    table, warm = candidate_table(work), candidate_table(work[:1])
    pairs = table.num_rows
    common = {"llm": llm_name, "n_samples": args.samples, "per_candidate_samples": args.per_candidate,
              "executor": "local"}  # fmt: skip
    out: dict[str, Any] = {"variants": {}}
    if "vllm" in args.stage_backends.split(","):
        stage = LabelStage(load_config(LabelConfig, backend="vllm", **common))
        stage.setup()
        stage.process(warm)  # first-call warm-up, not timed
        stage.llm.engine.reset_prefix_cache()
        stage.llm.generated_tokens = stage.llm.prefilled_tokens = 0
        print(f"in-process vllm: labelling {len(work)} queries", flush=True)
        start = time.perf_counter()
        stage.process(table)
        seconds = time.perf_counter() - start
        computed = stage.llm.prefilled_tokens + stage.llm.generated_tokens  # cache hits excluded
        out["variants"]["vllm_in_process"] = {
            "seconds": seconds, "pairs_per_s": pairs / seconds, "computed_tokens_per_s": computed / seconds
        }  # fmt: skip
        stage.llm.engine.llm_engine.engine_core.shutdown()
        del stage
        gc.collect()

    server = None
    url = args.server_url
    if not url:
        log = Path(tempfile.mkdtemp()) / "server.log"
        server = VLLMServer(log, max_model_len=4096).start(VLLM_SERVER_DEV_MODE="1")
        url = server.url
    root = url.removesuffix("/v1")

    def reset_cache() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{root}/reset_prefix_cache", method="POST"), timeout=60)
        except OSError as exc:
            print(f"prefix cache not reset ({exc}): start the server with VLLM_SERVER_DEV_MODE=1", flush=True)

    recorded: list[dict[str, Any]] = []
    post = ServerClient.post

    async def recording(self: ServerClient, payload: dict[str, Any], index: int) -> dict[str, Any]:
        reply = await post(self, payload, index)
        recorded.append({"body": {"model": self.served.id, **payload}, "usage": reply.get("usage", {})})
        return reply

    async def bare(payloads: list[dict[str, Any]], concurrency: int) -> int:
        """The requests at `concurrency` in flight, nothing else: the server's ceiling. Tokens the server counted."""
        slots = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(body: dict[str, Any]) -> int:
                async with slots, session.post(f"{url}/completions", json=body) as reply:
                    return (await reply.json())["usage"]["total_tokens"]

            return sum(await asyncio.gather(*(one(b) for b in payloads)))

    try:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            config = load_config(LabelConfig, backend="server", llm_url=url, max_concurrency=concurrency, **common)
            stage = LabelStage(config, served_model(config))
            stage.setup()
            stage.process(warm)
            ServerClient.post = recording  # type: ignore[method-assign]
            recorded.clear()
            reset_cache()
            print(f"server backend, {concurrency} in flight: labelling {len(work)} queries", flush=True)
            start = time.perf_counter()
            stage.process(table)
            seconds = time.perf_counter() - start
            ServerClient.post = post  # type: ignore[method-assign]
            stage.llm.close()
            if not recorded:  # the stage no longer sends its requests through ServerClient.post: nothing to compare
                raise SystemExit("server backend: no request recorded through ServerClient.post")
            tokens = sum(r["usage"].get("total_tokens", 0) for r in recorded)
            # sampling requests first, as the stage sends them (the scoring ones carry prompt_logprobs)
            payloads = sorted((r["body"] for r in recorded), key=lambda b: "prompt_logprobs" in b)
            reset_cache()
            print(f"bare client, {concurrency} in flight: {len(payloads)} requests", flush=True)
            start = time.perf_counter()
            bare_tokens = asyncio.run(bare(payloads, concurrency))
            bare_seconds = time.perf_counter() - start
            out["variants"][f"server_c{concurrency}"] = {
                "seconds": seconds, "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
                "requests": len(payloads),
            }  # fmt: skip
            out["variants"][f"bare_c{concurrency}"] = {
                "seconds": bare_seconds, "pairs_per_s": pairs / bare_seconds,
                "tokens_per_s": bare_tokens / bare_seconds,
            }  # fmt: skip
            out[f"server_vs_bare_c{concurrency}"] = bare_seconds / seconds
    finally:
        ServerClient.post = post  # type: ignore[method-assign]
        if server is not None:
            server.stop()
    runs = [k for k in out["variants"] if k.startswith("server_c")]
    best = max(runs, key=lambda k: out["variants"][k]["pairs_per_s"])
    out["best_concurrency"] = int(best.removeprefix("server_c"))
    if "vllm_in_process" in out["variants"]:
        out["server_best_vs_in_process"] = (
            out["variants"][best]["pairs_per_s"] / out["variants"]["vllm_in_process"]["pairs_per_s"]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 queries instead of 16 (under 5 minutes here)")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--llm", default=None, help="default: lemb's default LLM")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random-init", action="store_true", help="--llm's architecture with fresh weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="naive,transformers,vllm")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--vllm-no-cache", action="store_true", help="also time vLLM's default: prompt_logprobs without cache reads"
    )
    parser.add_argument("--server", action="store_true", help="server backend vs in-process vLLM vs a bare client")
    parser.add_argument("--server-url", default="", help="--server: a running server (default: start one here)")
    parser.add_argument("--concurrency", default="4,16,64", help="--server: requests in flight, comma-separated")
    parser.add_argument("--stage", action="store_true", help="the whole label stage, per-query vs batched blocks")
    parser.add_argument("--stage-backends", default="transformers,vllm")
    parser.add_argument("--per-candidate", type=int, default=2, help="m samples per candidate prompt (--stage)")
    parser.add_argument("--block-tokens", default="", help="--stage: batched block sizes, comma-separated (the first "
                        "is 'batched'; default: the stage's default)")  # fmt: skip
    args = parser.parse_args()

    from lemb.data.tasks import task_spec
    from lemb.pipeline.executor import set_threads
    from lemb.stages.llm.hf import TransformersBackend
    from lemb.stages.models import resolve_model_path
    from lemb.vocabulary import DEFAULT_LLM

    set_threads(args.threads)
    llm_name = args.llm or DEFAULT_LLM
    if args.random_init:
        llm_name = random_init_llm(resolve_model_path(llm_name, "LLM"), args.dtype)
    n_queries = args.queries or (4 if args.quick else 16)
    work = make_workload(args.data, n_queries, args.candidates)
    if args.stage or args.server:
        run = server_throughput if args.server else stage_throughput
        out = run(args, resolve_model_path(llm_name, "LLM"), work)
        out["workload"] = {"llm": llm_name, "dtype": args.dtype, "queries": n_queries, "candidates": args.candidates,
                           "n_samples": args.samples, "per_candidate_samples": args.per_candidate,
                           "threads": args.threads, "cpus": os.cpu_count(),
                           "machine": platform.processor() or platform.machine()}  # fmt: skip
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return
    variants = args.variants.split(",")
    tf = TransformersBackend(llm_name, dtype=args.dtype)
    device = tf.device.type
    # the machine's practical limit: the best of dense-matmul runs taken between the variants (the machine is shared)
    peaks = [matmul_flops(device, args.dtype)]
    budget = task_spec("qa").max_new_tokens
    pools = [
        sorted({s for s in tf.sample_many([w["bare"]], [args.samples], budget, 1.0, [i])[0] if s} - {w["target"]})
        for i, w in enumerate(work)
    ]
    body, head = model_shape(resolve_model_path(llm_name, "LLM"))
    prompt_tokens = [[len(tf._encode_prompt(p)) for p in w["prompts"]] for w in work]
    cont_tokens = [[len(c) for c in tf._encode_continuations([w["target"], *pool])] for w, pool in zip(work, pools)]
    # necessary FLOPs: body over each prompt once and every continuation token; vocabulary only where predicted
    useful = sum(
        2 * body * (p + sum(cs)) + 2 * head * sum(cs) for ps, cs in zip(prompt_tokens, cont_tokens) for p in ps
    )
    processed = {
        "naive": sum(p * len(cs) + sum(cs) for ps, cs in zip(prompt_tokens, cont_tokens) for p in ps),
    }
    results: dict[str, dict[str, Any]] = {}
    if "naive" in variants:
        results["naive"] = run_variant("naive", functools.partial(naive_scores, tf), work, pools)
    peaks.append(matmul_flops(device, args.dtype))
    if "transformers" in variants:
        tf.prefilled_tokens = 0
        results["transformers"] = run_variant("transformers", tf.score_many, work, pools)
        processed["transformers"] = tf.prefilled_tokens
    del tf  # the vLLM engine gets the memory (and, on a GPU, the device) to itself
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    if "vllm" in variants:
        from lemb.stages.llm.vllm_engine import VLLMBackend

        peaks.append(matmul_flops(device, args.dtype))
        start = time.perf_counter()
        engine = VLLMBackend(llm_name, dtype=args.dtype)
        engine.score_many([(work[0]["bare"], [work[0]["target"]])])  # first-call warm-up, not timed
        started = time.perf_counter() - start
        engine.prefilled_tokens = 0
        results["vllm"] = run_variant("vllm", engine.score_many, work, pools)
        results["vllm"]["engine_start_s"] = started
        processed["vllm"] = engine.prefilled_tokens
        decode_bound = forced_decode_bound(engine, work, pools)
        if args.vllm_no_cache:
            engine.read_prefix_cache = False
            no_cache = run_variant("vllm without prefix-cache reads", engine.score_many, work, pools)
    peaks.append(matmul_flops(device, args.dtype))
    peak = max(peaks)
    base = results.get("naive", {}).get("seconds")
    out: dict[str, Any] = {"variants": {}}
    for name, r in results.items():
        out["variants"][name] = {
            "pairs_per_s": r["pairs"] / r["seconds"],
            "tokens_per_s": processed[name] / r["seconds"],
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "speedup_vs_naive": base / r["seconds"] if base else None,
            "flops_fraction": useful / r["seconds"] / peak,
            "seconds": r["seconds"],
            **({"engine_start_s": r["engine_start_s"]} if "engine_start_s" in r else {}),
        }
    # per-sequence summed log-probabilities (the scorers return the mean and the token count)
    sums = {name: [s * n for per_item in r["scores"] for s, n in per_item] for name, r in results.items()}
    names = list(sums)
    out["max_abs_logprob_diff"] = max(
        (abs(a - b) for i, x in enumerate(names) for y in names[i + 1 :] for a, b in zip(sums[x], sums[y])),
        default=None,
    )
    out["workload"] = {
        "llm": llm_name, "dtype": args.dtype, "device": device, "queries": n_queries,
        "candidates": args.candidates, "pairs": n_queries * args.candidates, "samples": args.samples,
        "distinct_pool_mean": sum(map(len, pools)) / len(pools),
        "continuations_scored": sum(len(c) for c in cont_tokens) * args.candidates,
        "prompt_tokens_mean": sum(map(sum, prompt_tokens)) / sum(map(len, prompt_tokens)),
        "useful_flops": useful, "matmul_flops_per_s": peak, "matmul_runs": peaks, "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }  # fmt: skip
    if "vllm" in results:
        out["vllm_forced_decode_lower_bound"] = decode_bound
    if "vllm" in results and args.vllm_no_cache:
        out["vllm_prompt_logprobs_without_cache"] = {
            "pairs_per_s": no_cache["pairs"] / no_cache["seconds"],
            "seconds": no_cache["seconds"],
        }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
