"""How lemb's stages scale from 1k to 100k queries: wall time, rows/s and peak memory of the driver and of the
largest Ray worker, each stage run through the CLI as a subprocess on a local 2-worker Ray cluster.

    python bench/scale.py [--quick] [--sizes 1000,10000,100000] [--label-max 20000] [--json OUT] [--workdir DIR]

Data (deterministic, seeded): synthetic knowledge-QA records with NQ's sizes on disk: a passage of ~100 words with
a 2-4 word title per key, a ~9-word question and a 1-4 word target per query, one positive passage per query
(the query's own; it contains the target), and as many keys as queries, so the corpus grows with the size. Words
are drawn Zipf-like from the embedder's whole-word vocabulary.

Models (built from a config with fresh weights, saved once in the workdir): a tiny Llama-shaped causal LM
(hidden 64, 2 layers, 2 heads of 32, MLP 128) with a 2,048-token byte-level BPE trained on the synthetic words
(the default LLM's special tokens and chat template), and a tiny
BERT-shaped embedder (hidden 64, 2 layers, 2 heads, MLP 128) with the default embedder's tokenizer. The point is
that the pipeline's own cost shows, not the models'.

Per size N: a fresh run folder, then

    lemb retrieve --queries Q --corpus C --run RUN --embedder EMB --top-k 2 --executor ray --workers 2 --shards S
    lemb label --run RUN --llm LLM --backend transformers --n-samples 2 --per-candidate-samples 1 \
        --executor ray --workers 2                              (only for N <= --label-max; shards: retrieve's)
    lemb train --run RUN --embedder EMB --steps 20 --batch-size 16 --config (group_size: 2, save_every: 0)

all with --quiet, S = max(4, N // 2500) shards (a shard never holds more than 2,500 queries or keys). Where N is
above --label-max, the label shards are synthesized instead from retrieve's candidate shards (REWARD rows with
random log-probabilities, written with lemb.pipeline.shards.open_stage / write_shard, one per candidate shard) so
that train still runs at N; the table marks them. If --label-max lies between the given sizes, it is added as a
size (so label's largest size is --label-max).

Measured per stage and size: wall time of the CLI subprocess; rows/s (retrieve: queries + keys; label: queries;
train: reward rows indexed, with a fixed 20 steps); peak RSS (VmHWM) of the driver (the CLI process) and of the
largest single Ray worker (descendant processes whose title contains "ray::"), polled every 0.25 s. For label:
the share of its wall time outside the backend's sampling and scoring calls,
1 - (sample_seconds + score_seconds) / (workers x wall), and the same share within the shards' processing span
(first shard start to last shard end, so Ray start-up and model loading are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
TOP_K = 2
N_SAMPLES, PER_CANDIDATE = 2, 1
TRAIN_STEPS, TRAIN_BATCH = 20, 16
SHARD_ROWS = 2500
POLL = 0.25


def shards_for(size: int) -> int:
    return max(4, size // SHARD_ROWS)


# ---------------------------------------------------------------------------------------------------------- data


def _vocabulary(tokenizer_dir: str) -> tuple[list[str], list[float]]:
    """Whole words of the embedder's WordPiece vocabulary (roughly in frequency order) and Zipf cumulative weights."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    words = []
    for line in sorted(vocab, key=vocab.get):
        if line.isalpha() and line.isascii() and (len(line) > 1 or line in ("a", "i")):
            words.append(line)
    cum, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 10)
        cum.append(total)
    return words, cum


def make_data(folder: Path, size: int, tokenizer_dir: str, seed: int = 0) -> tuple[Path, Path]:
    """queries.jsonl and corpus.jsonl of `size` records each (written once per size)."""
    queries, corpus = folder / f"queries-{size}.jsonl", folder / f"corpus-{size}.jsonl"
    if queries.exists() and corpus.exists():
        return queries, corpus
    folder.mkdir(parents=True, exist_ok=True)
    words, cum = _vocabulary(tokenizer_dir)
    rng = random.Random(f"{seed}-{size}")
    wh = ["who", "what", "when", "where", "which", "how many", "who wrote", "when did", "where is", "what is"]

    def draw(k: int) -> list[str]:
        return rng.choices(words, cum_weights=cum, k=k)

    tmp_q, tmp_c = queries.with_suffix(".tmp"), corpus.with_suffix(".tmp")
    with open(tmp_q, "w") as fq, open(tmp_c, "w") as fc:
        for i in range(size):
            target = " ".join(draw(rng.randint(1, 4)))
            question = f"{rng.choice(wh)} {' '.join(draw(rng.randint(5, 9)))}?"
            body = draw(rng.randint(90, 110))
            at = rng.randrange(len(body))
            text = " ".join(body[:at] + [target] + body[at:])
            title = " ".join(w.capitalize() for w in draw(rng.randint(2, 4)))
            key_id, query_id = f"k{i:07d}", f"q{i:07d}"
            fc.write(json.dumps({"key_id": key_id, "task": "qa", "text": text, "title": title}) + "\n")
            fq.write(json.dumps({"query_id": query_id, "task": "qa", "text": question, "target": target,
                                 "positive_ids": [key_id], "history": []}) + "\n")  # fmt: skip
    tmp_q.replace(queries)
    tmp_c.replace(corpus)
    return queries, corpus


# -------------------------------------------------------------------------------------------------------- models


def build_models(folder: Path) -> tuple[str, str]:
    """The tiny LLM and embedder with fresh weights (saved once)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from lemb.stages.models import resolve_model_path

    llm_dir, emb_dir = folder / "tiny-llm", folder / "tiny-embedder"
    if not (llm_dir / "config.json").exists():
        from transformers import GenerationConfig

        from lemb.data.tasks import TASK_SPECS

        src = resolve_model_path("smollm2-135m-instruct", "LLM")
        # a byte-level BPE of 2,048 tokens trained on the synthetic vocabulary, with the default LLM's special tokens
        # and chat template: with its 49,152-token vocabulary, the vocabulary projection and softmax of a hidden-64
        # model would be nearly all of label's cost, where the point is to see the pipeline's own
        words, _ = _vocabulary(resolve_model_path("all-minilm-l6-v2", "embedder"))
        texts = [" ".join(words[i : i + 64]) for i in range(0, min(len(words), 40_000), 64)]
        texts += [spec.prompt + "\n" + spec.bare_prompt for spec in TASK_SPECS.values()]
        tokenizer = AutoTokenizer.from_pretrained(src).train_new_from_iterator(texts, vocab_size=2048)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True, rms_norm_eps=1e-5,
        )  # fmt: skip
        torch.manual_seed(0)
        tmp = llm_dir.with_name(".tiny-llm.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos).save_pretrained(tmp)
        tmp.rename(llm_dir)
    if not (emb_dir / "config.json").exists():
        src = resolve_model_path("all-minilm-l6-v2", "embedder")
        base = json.loads((Path(src) / "config.json").read_text())
        config = BertConfig(
            vocab_size=base["vocab_size"], hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=512,
        )  # fmt: skip
        torch.manual_seed(0)
        tmp = emb_dir.with_name(".tiny-embedder.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        BertModel(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        tmp.rename(emb_dir)
    return str(llm_dir), str(emb_dir)


# ------------------------------------------------------------------------------------------------------ measuring


def _hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of one process, in MB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Watch:
    """Polls the CLI process and its descendants: the driver's VmHWM and the largest VmHWM of any Ray worker."""

    def __init__(self, pid: int) -> None:
        self.pid, self.driver, self.worker, self.worker_title = pid, 0.0, 0.0, ""
        self.ray_total = 0.0  # peak summed RSS of all descendants (Ray's own daemons included)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        titles: dict[int, str] = {}
        rounds = 0
        while not self._stop.is_set():
            self.driver = max(self.driver, _hwm_mb(self.pid))
            if rounds % 4 == 0:  # finding descendants scans every process: once a second is enough
                try:
                    children = root.children(recursive=True)
                except psutil.NoSuchProcess:
                    break
                total = 0.0
                for child in children:
                    try:
                        titles[child.pid] = " ".join(child.cmdline())  # a Ray worker's title changes (IDLE, actor)
                        total += child.memory_info().rss / 2**20
                    except psutil.Error:
                        titles.pop(child.pid, None)
                self.ray_total = max(self.ray_total, total)
            for pid, title in titles.items():  # VmHWM is a high-water mark: polling only has to catch it before exit
                if "ray::" in title:
                    hwm = _hwm_mb(pid)
                    if hwm > self.worker:
                        self.worker, self.worker_title = hwm, title[:60].strip()
            rounds += 1
            self._stop.wait(POLL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # the CLI gets SIGTERM as usual


def report_sigterm() -> None:
    """On a shared machine, say who sent this process SIGTERM (then exit as SIGTERM would)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before any other thread starts: all inherit it

    def wait() -> None:
        info = signal.sigwaitinfo({signal.SIGTERM})
        try:
            who = " ".join(psutil.Process(info.si_pid).cmdline())[:200]
        except psutil.Error:
            who = "gone"
        print(f"SIGTERM from pid {info.si_pid} ({who}) at {time.strftime('%H:%M:%S')}", flush=True)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, daemon=True).start()


class Killed(RuntimeError):
    """The CLI process ended by a signal it did not raise itself (someone else's kill on a shared machine)."""


def run_stage(args: list[str], log: Path, output: Path, tries: int = 3) -> dict[str, Any]:
    """run_cli, rerun from scratch (the stage's output removed, so nothing is resumed) if a signal killed it."""
    for attempt in range(1, tries + 1):
        try:
            result = run_cli(args, log)
            result["killed_and_rerun"] = attempt - 1
            return result
        except Killed as exc:
            print(f"  {exc}; rerunning from scratch (attempt {attempt + 1} of {tries})", flush=True)
            shutil.copy(log, log.with_name(f"{log.stem}.killed-{attempt}.log"))
            shutil.rmtree(output, ignore_errors=True)
    raise RuntimeError(f"{args[0]} was killed {tries} times")


def code_state() -> dict[str, Any]:
    """The commit the CLI runs and how many files under lemb/ differ from it (the tree may change during a run)."""

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"head": git("rev-parse", "--short", "HEAD"), "lemb_changed_files": len(git("status", "--porcelain",
            "lemb").splitlines())}  # fmt: skip


def run_cli(args: list[str], log: Path) -> dict[str, Any]:
    """One `python -m lemb.cli ...` subprocess: wall seconds, peak RSS of the driver and of the largest Ray worker."""
    cmd = [sys.executable, "-m", "lemb.cli", *args]
    code = code_state()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_unblock)
        watch = Watch(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        watch.stop()
    text = log.read_text()
    if proc.returncode < 0 or "SIGTERM received" in text:
        raise Killed(f"{args[0]} ended by a signal (exit {proc.returncode})")
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(args[:1])} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {
        "seconds": seconds,
        "code": code,
        "driver_peak_rss_mb": round(watch.driver, 1),
        "worker_peak_rss_mb": round(watch.worker, 1) if watch.worker else None,
        "worker_title": watch.worker_title or None,
        "descendants_peak_rss_mb": round(watch.ray_total, 1),
        # ru_maxrss of the waited child: on Linux the max over it and its reaped descendants (Ray's daemons)
        "wait4_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def shard_span(stage_dir: Path) -> float:
    """First shard's start to last shard's end: each shard's output mtime minus its processing seconds."""
    starts, ends = [], []
    for part in stage_dir.glob("part-*.parquet"):
        stats = json.loads(part.with_name(part.name.replace(".parquet", ".stats.json")).read_text())
        end = part.stat().st_mtime
        starts.append(end - stats["seconds"])
        ends.append(end)
    return max(ends) - min(starts) if ends else 0.0


# ------------------------------------------------------------------------------------------ synthetic label shards


def synthesize_labels(run: Path, llm: str, seed: int = 0) -> dict[str, Any]:
    """Label shards without the LLM: one REWARD shard per candidate shard, rows carrying the candidates' texts,
    random log-probabilities over a pool like the real stage's (N = 2 bare + 1 per candidate), rewards computed
    by the stage's own functions; manifest, shard files and _stats.json through lemb.pipeline.shards."""
    import pyarrow.parquet as pq

    from lemb.data import schemas
    from lemb.pipeline.config import LabelConfig, config_hash, load_config, to_dict
    from lemb.pipeline.shards import MANIFEST, ShardPlan, finish_stage, open_stage, write_shard
    from lemb.stages.reward import rank_of_target, reward_from_logprobs

    start = time.perf_counter()
    cand_dir, out = run / "retrieve" / "candidates", run / "label"
    cfg = load_config(LabelConfig, None, run=str(run), llm=llm, backend="transformers", n_samples=N_SAMPLES,
                      per_candidate_samples=PER_CANDIDATE, executor="ray", workers=WORKERS)  # fmt: skip
    plan = ShardPlan.of_stage(cand_dir, "query_id")
    digest = config_hash(cfg, {"synthetic": "bench/scale.py"})
    open_stage(out, "label", to_dict(cfg), digest, [cand_dir / MANIFEST], plan, restart=True)
    rng = random.Random(seed)
    rows_out = 0
    for index, path in enumerate(plan.inputs):
        out_rows = []
        for rows in schemas.by_query(pq.read_table(path).to_pylist()):
            drawn = N_SAMPLES + PER_CANDIDATE * len(rows)
            distinct = rng.randint(1, drawn)
            counts = [1] * distinct
            for _ in range(drawn - distinct):
                counts[rng.randrange(distinct)] += 1
            pool = [" ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(1, 8))) for _ in range(distinct)]
            baseline = [-rng.uniform(0.5, 5.0) for _ in range(distinct + 1)]
            for r in rows:
                values = [-rng.uniform(0.5, 5.0) for _ in range(distinct + 1)]
                out_rows.append({
                    **{name: None for name in schemas.REWARD.names},
                    **{k: r[k] for k in ("query_id", "task", "key_id", "retrieval_rank", *schemas.CARRIED)},
                    "target_logprob": values[0], "target_tokens": len(r["target"].split()) + 1,
                    "samples": pool, "sample_counts": counts, "sample_logprobs": values[1:],
                    "baseline_target_logprob": baseline[0], "baseline_sample_logprobs": baseline[1:],
                    "pool_size": drawn,
                    "rank": rank_of_target(values[0], values[1:], counts),
                    "reward": reward_from_logprobs("rank", values[0], values[1:], counts, baseline[0], baseline[1:]),
                    "baseline_rank": rank_of_target(baseline[0], baseline[1:], counts),
                })  # fmt: skip
        import pyarrow as pa

        table = pa.Table.from_pylist(out_rows, schema=schemas.REWARD)
        metadata = {"lemb.stage": "label", "lemb.synthetic": "bench/scale.py", "lemb.tie_tolerance": repr(1e-6)}
        stats = {"rows_in": plan.rows(index), "rows_out": table.num_rows, "seconds": 0.0, "synthetic": 1}
        write_shard(out, index, table, schemas.REWARD, metadata, stats)
        rows_out += table.num_rows
    finish_stage(out, len(plan), [])
    return {"seconds": time.perf_counter() - start, "rows_out": rows_out, "shards": len(plan)}


# ----------------------------------------------------------------------------------------------------------- main


def run_size(size: int, args: argparse.Namespace, llm: str, emb: str, tokenizer_dir: str) -> dict[str, Any]:
    work = args.workdir
    queries, corpus = make_data(work / "data", size, tokenizer_dir)
    run = work / "runs" / f"n{size}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shards = shards_for(size)
    ray_flags = ["--executor", "ray", "--workers", str(WORKERS), "--quiet"]
    out: dict[str, Any] = {}

    print(f"[{size}] retrieve ({shards} shards, {args.index} index)", flush=True)
    index_flags = []
    if args.index != "flat":
        (run / "retrieve-config.yaml").write_text(f"index: {args.index}\n")
        index_flags = ["--config", str(run / "retrieve-config.yaml")]
    r = run_stage(["retrieve", "--queries", str(queries), "--corpus", str(corpus), "--run", str(run),
                 "--embedder", emb, "--top-k", str(TOP_K), "--shards", str(shards), *index_flags, *ray_flags],
                run / "retrieve.log", run / "retrieve")  # fmt: skip
    r["rows"] = 2 * size
    for step in ("keys", "candidates"):
        r[f"{step}_shard_seconds"] = json.loads((run / "retrieve" / step / "_stats.json").read_text())["seconds"]
    out["retrieve"] = r
    print(f"[{size}] retrieve: {r['seconds']:.1f} s", flush=True)

    if size <= args.label_max:
        print(f"[{size}] label", flush=True)
        lab = run_stage(["label", "--run", str(run), "--llm", llm, "--backend", "transformers",
                       "--n-samples", str(N_SAMPLES), "--per-candidate-samples", str(PER_CANDIDATE), *ray_flags],
                      run / "label.log", run / "label")  # fmt: skip
        stats = json.loads((run / "label" / "_stats.json").read_text())
        backend = stats.get("sample_seconds", 0.0) + stats.get("score_seconds", 0.0)
        span = shard_span(run / "label")
        lab.update({
            "rows": size, "shards": stats["shards"], "sample_seconds": stats.get("sample_seconds", 0.0),
            "score_seconds": stats.get("score_seconds", 0.0), "shard_seconds": stats.get("seconds", 0.0),
            "shard_span_seconds": span, "reward_rows": int(stats.get("rows_out", 0)),
            "queries_labelled": int(stats.get("queries_labelled", 0)),
            "overhead_fraction": 1 - backend / (WORKERS * lab["seconds"]),
            "overhead_fraction_in_span": 1 - backend / (WORKERS * span) if span else None,
            "overhead_fraction_in_shards": 1 - backend / stats["seconds"] if stats.get("seconds") else None,
        })  # fmt: skip
        out["label"] = lab
        print(f"[{size}] label: {lab['seconds']:.1f} s, overhead {lab['overhead_fraction']:.3f}", flush=True)
    else:
        print(f"[{size}] label shards synthesized (above --label-max {args.label_max})", flush=True)
        out["label_synthetic"] = synthesize_labels(run, llm)

    config = run / "train-config.yaml"
    config.write_text("group_size: 2\nsave_every: 0\n")
    print(f"[{size}] train", flush=True)
    t = run_stage(["train", "--run", str(run), "--embedder", emb, "--steps", str(TRAIN_STEPS),
                   "--batch-size", str(TRAIN_BATCH), "--config", str(config), "--quiet"],
                  run / "train.log", run / "train")  # fmt: skip
    import pyarrow.parquet as pq

    t["rows"] = sum(pq.ParquetFile(p).metadata.num_rows for p in (run / "label").glob("part-*.parquet"))
    tstats = json.loads((run / "train" / "_stats.json").read_text())
    t["loop_seconds"], t["groups"] = tstats["seconds"], tstats["groups"]
    t["synthetic_labels"] = "label_synthetic" in out
    out["train"] = t
    print(f"[{size}] train: {t['seconds']:.1f} s", flush=True)
    if args.clean:
        for sub in ("retrieve", "label"):
            shutil.rmtree(run / sub, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000 (under 10 minutes here)")
    parser.add_argument("--sizes", default=None, help="comma-separated query counts (default 1000,10000,100000)")
    parser.add_argument(
        "--label-max",
        type=int,
        default=None,
        help="largest size the real label stage runs at (default 20000; 1000 with --quick)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lemb-scale"))
    parser.add_argument(
        "--index",
        default="flat",
        choices=("flat", "ivf", "hnsw"),
        help="retrieve's faiss index (default flat, the pipeline's default)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="take the sizes an earlier invocation finished (same workdir, index, label-max)",
    )
    parser.add_argument("--clean", action="store_true", help="remove each size's retrieve and label output")
    args = parser.parse_args()
    report_sigterm()
    if args.label_max is None:
        args.label_max = 1000 if args.quick else 20000
    sizes = sorted({int(s) for s in (args.sizes or ("1000,10000" if args.quick else "1000,10000,100000")).split(",")})
    if sizes[0] < args.label_max < sizes[-1]:
        sizes = sorted({*sizes, args.label_max})
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    load_start = os.getloadavg()
    print(f"sizes {sizes}; label up to {args.label_max}; shards = max(4, N // {SHARD_ROWS}); "
          f"load average at start {load_start[0]:.2f}", flush=True)  # fmt: skip

    llm, emb = build_models(args.workdir / "models")
    results: dict[int, dict[str, Any]] = {}
    for size in sizes:
        saved = args.workdir / "results" / f"n{size}-{args.index}-label{args.label_max}.json"
        if args.resume and saved.exists():
            print(f"[{size}] results of an earlier invocation: {saved}", flush=True)
            results[size] = json.loads(saved.read_text())
            continue
        results[size] = run_size(size, args, llm, emb, emb)
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(results[size], indent=1))
    load_end = os.getloadavg()

    stages: dict[str, dict[str, dict[str, Any]]] = {"retrieve": {}, "label": {}, "train": {}}
    for size, res in results.items():
        for stage in stages:
            if stage in res:
                r = res[stage]
                stages[stage][str(size)] = {
                    "seconds": round(r["seconds"], 2),
                    "rows_per_s": round(r["rows"] / r["seconds"], 2),
                    "driver_peak_rss_mb": r["driver_peak_rss_mb"],
                    "worker_peak_rss_mb": r["worker_peak_rss_mb"],
                    **{k: v for k, v in r.items() if k not in ("seconds", "driver_peak_rss_mb", "worker_peak_rss_mb")},
                    "shards": r.get("shards", shards_for(size)),
                }
    rss_ratio, time_ratio = {}, {}
    for stage, per_size in stages.items():
        ns = sorted(int(s) for s in per_size)
        if len(ns) >= 2:
            lo, hi, second = per_size[str(ns[0])], per_size[str(ns[-1])], per_size[str(ns[-2])]
            rss_ratio[stage] = hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"]
            time_ratio[stage] = (hi["seconds"] / hi["rows"]) / (second["seconds"] / second["rows"])
    label_sizes = sorted(int(s) for s in stages["label"])
    label_top = stages["label"][str(label_sizes[-1])] if label_sizes else None
    summary = {
        "sizes": sizes,
        "stages": stages,
        "driver_rss_ratio": max(rss_ratio.values()) if rss_ratio else None,
        "time_per_row_ratio": max(time_ratio.values()) if time_ratio else None,
        "label_overhead_fraction": label_top["overhead_fraction"] if label_top else None,
        "driver_rss_ratio_per_stage": rss_ratio,
        "time_per_row_ratio_per_stage": time_ratio,
        "label_overhead_fraction_in_span": label_top["overhead_fraction_in_span"] if label_top else None,
        "label_overhead_fraction_in_shards": label_top["overhead_fraction_in_shards"] if label_top else None,
        "label_max": args.label_max,
        "synthetic_label_sizes": [s for s, r in results.items() if "label_synthetic" in r],
        "synthesis": {str(s): r["label_synthetic"] for s, r in results.items() if "label_synthetic" in r},
        "shards": {str(s): shards_for(s) for s in sizes},
        "settings": {
            "index": args.index,
            "workers": WORKERS,
            "top_k": TOP_K,
            "n_samples": N_SAMPLES,
            "per_candidate_samples": PER_CANDIDATE,
            "train_steps": TRAIN_STEPS,
            "train_batch_size": TRAIN_BATCH,
            "group_size": 2,
            "shards": f"max(4, N // {SHARD_ROWS})",
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },  # fmt: skip
        "total_seconds": time.time() - began,
    }
    print()
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


def _fmt(x: float | None, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def markdown(s: dict[str, Any]) -> str:
    lines = [
        "| stage | queries | shards | wall (s) | rows | rows/s | ms per row | driver peak RSS (MB) "
        "| largest worker peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, per_size in s["stages"].items():
        for size in sorted(per_size, key=int):
            r = per_size[size]
            what = {"retrieve": "queries + keys", "label": "queries", "train": "reward rows"}[stage]
            note = ""
            if stage == "train":
                note = f", {TRAIN_STEPS} steps" + (", synthetic label shards" if r.get("synthetic_labels") else "")
            lines.append(
                f"| {stage} | {int(size):,} | {r['shards']} | {r['seconds']:.1f} | {r['rows']:,} {what}{note} "
                f"| {r['rows_per_s']:,.1f} | {1000 * r['seconds'] / r['rows']:.2f} | {_fmt(r['driver_peak_rss_mb'])} "
                f"| {_fmt(r['worker_peak_rss_mb'])} |"
            )
    out = ["\n".join(lines), ""]
    retrieve = s["stages"]["retrieve"]
    if retrieve:
        out.append("| retrieve queries | keys step: worker ms per key | candidates step (encode + search + key "
                   "texts): worker ms per query |")  # fmt: skip
        out.append("|---|---|---|")
        for size in sorted(retrieve, key=int):
            r = retrieve[size]
            out.append(f"| {int(size):,} | {1000 * r['keys_shard_seconds'] / int(size):.2f} "
                       f"| {1000 * r['candidates_shard_seconds'] / int(size):.2f} |")  # fmt: skip
        out.append("")
    label = s["stages"]["label"]
    if label:
        out.append("| label queries | wall (s) | sample s | score s | shard s (summed) | overhead of wall | "
                   "overhead within the shard span | overhead within shards |")  # fmt: skip
        out.append("|---|---|---|---|---|---|---|---|")
        for size in sorted(label, key=int):
            r = label[size]
            out.append(
                f"| {int(size):,} | {r['seconds']:.1f} | {r['sample_seconds']:.1f} | {r['score_seconds']:.1f} "
                f"| {r['shard_seconds']:.1f} | {r['overhead_fraction']:.3f} "
                f"| {_fmt(r['overhead_fraction_in_span'], 3)} | {_fmt(r['overhead_fraction_in_shards'], 3)} |"
            )
        out.append("")
    checks = []
    for stage, ratio in s["driver_rss_ratio_per_stage"].items():
        checks.append(f"- driver peak RSS, largest / smallest size, {stage}: {ratio:.2f}x "
                      f"({'holds' if ratio <= 1.5 else 'MISSED'}: <= 1.5x)")  # fmt: skip
    for stage, ratio in s["time_per_row_ratio_per_stage"].items():
        checks.append(f"- time per row, largest / second-largest size, {stage}: {ratio:.2f}x "
                      f"({'holds' if ratio <= 1.25 else 'MISSED'}: <= 1.25x)")  # fmt: skip
    if s["label_overhead_fraction"] is not None:
        f = s["label_overhead_fraction"]
        checks.append(f"- label time outside backend calls at its largest size: {f:.1%} of wall "
                      f"({'holds' if f <= 0.10 else 'MISSED'}: <= 10%); within the shard span "
                      f"{s['label_overhead_fraction_in_span']:.1%}, within shards "
                      f"{s['label_overhead_fraction_in_shards']:.1%}")  # fmt: skip
    out += checks
    if s["synthetic_label_sizes"]:
        out.append(
            f"- label shards synthesized (no LLM) at: {', '.join(f'{n:,}' for n in s['synthetic_label_sizes'])}"
        )
    m = s["machine"]
    out.append(f"- load average at start {m['load_average_start'][0]:.2f}, at end {m['load_average_end'][0]:.2f}; "
               f"total {s['total_seconds'] / 60:.1f} min")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
