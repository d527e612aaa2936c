"""Reward resolution vs cost (issue 14, part 3): the rank reward from pools of 4, 8, 16 and 32 samples, and from
several tie tolerances, recomputed from one label run's stored log-probabilities (no new LLM call).

The label run must pool only samples of the bare prompt (`per_candidate_samples: 0`) and draw at least the largest
pool (`n_samples >= 32`). Every drawn sample's log-probability under every candidate's prompt is in the shards
(distinct samples with their multiplicities; the copies of the desired output and the empty samples were dropped
and are counted as `n_samples - pool_size`). A pool of n is n of the drawn samples taken without replacement, the
dropped ones included, with a seed per (query, n): i.i.d. samples, so such a sub-pool is an exact draw of n samples.
Its rank reward is then the label stage's own function over the kept samples.

For each pool size (and each tie tolerance at the largest size), the script reports: tied candidate pairs, queries
with no signal, gold agreement (gold first, MRR; `lemb.stages.agreement`), the dev nDCG@10 of an embedder trained on
those rewards (rank reward + graded loss, every other setting equal), and the label cost per query, estimated from
the run's measured sampling and scoring seconds: sampling scales with n, scoring with the distinct samples + 1 scored
under each candidate.

    python experiments/pool_size.py --run runs/ablation/qa/shared --dev runs/ablation/qa/data/dev.jsonl \\
        --corpus runs/ablation/qa/data/corpus.jsonl --out runs/pool_size --steps 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lemb.trainer.bootstrap import paired_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicate import Clock, machine, md_table, per_query_retrieval  # noqa: E402

log = logging.getLogger("pool_size")


def subpool_counts(counts: list[int], pool_size: int, drawn: int, n: int, seed: str) -> list[int]:
    """Multiplicity of each distinct competitor among `n` of the `drawn` samples taken without replacement; the
    `drawn - pool_size` samples the label stage dropped (copies of the desired output, empty ones) can be taken too.
    `seed`: a string; the same seed takes the same samples."""
    if not 0 < n <= drawn or sum(counts) != pool_size or pool_size > drawn:
        raise ValueError(f"cannot take {n} of {drawn} samples (pool of {pool_size}, counts {counts})")
    population = np.repeat(np.arange(len(counts) + 1), [*counts, drawn - pool_size])
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
    taken = rng.choice(population, size=n, replace=False)
    return np.bincount(taken, minlength=len(counts) + 1)[:-1].tolist()


def subpool_rows(rows: list[dict[str, Any]], drawn: int, n: int, seed: str, tie_tolerance: float) -> list[dict]:
    """A query's reward rows with the pool cut to `n` of its `drawn` samples (the same samples for every candidate:
    the pool is the query's), rank and reward recomputed by the label stage's functions."""
    from lemb.stages.reward import rank_of_target, reward_from_logprobs

    first = rows[0]
    if first["skip_reason"] not in (None, "no_competing_samples"):
        return rows  # no target: nothing to recompute
    counts = subpool_counts(first["sample_counts"], first["pool_size"], drawn, n, f"{seed}:{first['query_id']}:{n}")
    keep = [i for i, c in enumerate(counts) if c]
    kept = [counts[i] for i in keep]
    out = []
    for r in rows:
        new = dict(r)
        new["samples"] = [r["samples"][i] for i in keep]
        new["sample_counts"] = kept
        new["sample_logprobs"] = [r["sample_logprobs"][i] for i in keep]
        new["baseline_sample_logprobs"] = [r["baseline_sample_logprobs"][i] for i in keep]
        new["pool_size"] = sum(kept)
        if not kept:
            new.update(skip_reason="no_competing_samples", rank=None, reward=None, baseline_rank=None)
        else:
            lp, blp = r["target_logprob"], r["baseline_target_logprob"]
            new["skip_reason"] = None
            new["rank"] = rank_of_target(lp, new["sample_logprobs"], kept, tie_tolerance)
            new["reward"] = reward_from_logprobs("rank", lp, new["sample_logprobs"], kept, blp,
                                                 new["baseline_sample_logprobs"], tie_tolerance)  # fmt: skip
            new["baseline_rank"] = rank_of_target(blp, new["baseline_sample_logprobs"], kept, tie_tolerance)
        out.append(new)
    return out


def subpool_table(table: pa.Table, drawn: int, n: int, seed: str, tie_tolerance: float) -> pa.Table:
    """`subpool_rows` over every query of one reward shard, with the shard's schema and its metadata (the tie
    tolerance replaced by the one used here)."""
    from lemb.data.schemas import by_query

    rows = [r for q in by_query(table.to_pylist()) for r in subpool_rows(q, drawn, n, seed, tie_tolerance)]
    meta = dict(table.schema.metadata or {}) | {b"lemb.tie_tolerance": repr(tie_tolerance).encode()}
    return pa.Table.from_pylist(rows, schema=table.schema.with_metadata(meta))


def label_setup(label_dir: Path, subpools: bool = True) -> dict[str, Any]:
    """The sampling settings and measured seconds of a finished label stage, and its shards (`subpools`: refuse a
    run whose pools cannot be cut into exact sub-pools)."""
    from lemb.pipeline.shards import stage_files

    files = stage_files(label_dir)
    meta = pq.read_schema(files[0]).metadata
    sampling = json.loads(meta[b"lemb.sampling"])
    if subpools and sampling["m"] != 0:
        raise SystemExit(f"{label_dir}: pools hold per-candidate samples (m = {sampling['m']}); sub-pools need m = 0")
    stats = json.loads((label_dir / "_stats.json").read_text())
    return {"files": files, "drawn": sampling["n"], "tie_tolerance": float(meta[b"lemb.tie_tolerance"]),
            "stats": stats}  # fmt: skip


def pool_figures(tables: list[pa.Table], tie_tolerance: float) -> dict[str, Any]:
    """Ties, no-signal queries and gold agreement of the rank reward; mean distinct samples per query."""
    from lemb.data.schemas import by_query
    from lemb.stages.agreement import tally_agreement

    report = tally_agreement([(f"shard {i}", t) for i, t in enumerate(tables)], tie_tolerance)
    distinct = [len(q[0]["sample_counts"] or []) for t in tables for q in by_query(t.to_pylist())]
    return {"agreement": report["tasks"], "mean_distinct_samples": float(np.mean(distinct))}


def train_on(
    tables: list[pa.Table], out: Path, args: argparse.Namespace, tie_tolerance: float, **overrides: Any
) -> str:
    """An embedder trained on these reward rows (rank reward, graded loss, the run's other settings, `overrides`
    of TrainConfig's settings)."""
    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.trainer.batches import build_groups
    from lemb.trainer.recipe import TrainRecipe

    model = out / "train" / "model"
    if model.exists():
        return str(model)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "group_size": args.group_size, "seed": args.seed,
                "reward": "rank", "loss": {"qa": "graded"}} | overrides  # fmt: skip
    config = load_config(TrainConfig, run=str(out), save_every=0, threads=args.threads, **settings)
    groups, skipped = build_groups(tables, config.reward, config.group_size, str(out), tie_tolerance=tie_tolerance)
    recipe = TrainRecipe(config)
    try:
        recipe.setup(groups)
        recipe.skipped = skipped
        recipe.train(progress=False)
        return str(recipe.save())
    finally:
        recipe.cleanup()


def dev_ndcg(model: str, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Per dev query nDCG@10 of `model` (lemb eval's ranking, no LLM)."""
    return dev_metrics(model, out, args, getattr(args, "instructions", None))["ndcg@10"]


def dev_metrics(
    model: str, out: Path, args: argparse.Namespace, instructions: Any = None
) -> dict[str, dict[str, float]]:
    """{metric: {dev query: value}} of `model` (lemb eval's ranking and retrieval metrics, no LLM), embedded with
    `instructions` (None: eval's default)."""
    from lemb.data.readers import read_queries
    from lemb.pipeline.config import EvalConfig, load_config
    from lemb.stages.key_reuse import run_key_template
    from lemb.trainer.evaluate import rank

    template = args.key_template or run_key_template(args.run)
    config = load_config(EvalConfig, run=str(out), queries=str(args.dev), corpus=str(args.corpus),
                         executor="local", threads=args.threads, key_template=template,
                         instructions=instructions)  # fmt: skip
    ranked = rank(config, model, out / "rank", progress=False)
    records = read_queries(args.dev).to_pylist()
    return per_query_retrieval(ranked.ranking, records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder with a finished label stage (m = 0)")
    p.add_argument("--dev", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/pool_size"))
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 1e-6, 1e-3, 1e-2, 1e-1])
    p.add_argument(
        "--train-tolerances",
        type=float,
        nargs="*",
        default=None,
        help="the tolerances whose models are trained (default: all; the others get label-side figures)",
    )
    p.add_argument("--queries", type=int, default=0, help="the first N labelled queries (0: all)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--instructions",
        default="auto",
        help="instructions trained and ranked with (auto: the model's own; section 3 used llm-embedder)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-template", default=None, help="dev ranking's key template (default: the label run's)")
    p.add_argument("--no-train", action="store_true", help="only the label-side figures")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from lemb.pipeline.executor import quiet_libraries, set_threads

    quiet_libraries()
    set_threads(args.threads)
    clock = Clock()
    setup = label_setup(args.run / "label")
    shards = [pq.read_table(f) for f in setup["files"]]
    if args.queries:
        ids = sorted({q for t in shards for q in t.column("query_id").to_pylist()})[: args.queries]
        shards = [t.filter(pc.is_in(t.column("query_id"), pa.array(ids))) for t in shards]
    drawn, stats = setup["drawn"], setup["stats"]
    queries = sum(len(set(t.column("query_id").to_pylist())) for t in shards)
    labelled = max(stats.get("queries_labelled", 1), 1)
    per_query = {k: stats.get(k, 0.0) / labelled for k in ("sample_seconds", "score_seconds")}
    top = max(n for n in args.sizes if n <= drawn)  # the reference: the largest pool studied
    variants = [(n, setup["tie_tolerance"]) for n in args.sizes if n <= drawn]
    variants += [(top, t) for t in args.tolerances if t != setup["tie_tolerance"]]
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "drawn": drawn,
                               "queries": queries, "label_seconds_per_query": per_query, "variants": {}}  # fmt: skip
    full = pool_figures(shards, setup["tie_tolerance"])["mean_distinct_samples"]  # the stored pool, as labelled
    ndcg: dict[str, dict[str, float]] = {}
    for n, tol in variants:
        name = f"pool{n}_tol{tol:g}"
        tables = clock(f"{name}/subpool", lambda n=n, tol=tol: [subpool_table(t, drawn, n, str(args.seed), tol)
                                                                 for t in shards])  # fmt: skip
        figures = pool_figures(tables, tol)
        figures["pool"], figures["tie_tolerance"] = n, tol
        results["variants"][name] = figures
        trained = args.train_tolerances is None or tol == setup["tie_tolerance"] or tol in args.train_tolerances
        if not args.no_train and trained:
            folder = args.out / name
            model = clock(
                f"{name}/train",
                lambda t=tables, d=folder, tol=tol: train_on(t, d, args, tol, instructions=args.instructions),
            )
            ndcg[name] = clock(f"{name}/dev", lambda m=model, d=folder: dev_ndcg(m, d, args))
            figures["dev_ndcg@10"] = float(np.mean(list(ndcg[name].values())))
    for f in results["variants"].values():  # cost: sampling scales with n, scoring with the distinct samples + 1
        scoring = (f["mean_distinct_samples"] + 1) / (full + 1)
        f["est_label_seconds_per_query"] = (
            per_query["sample_seconds"] * f["pool"] / drawn + per_query["score_seconds"] * scoring
        )
    ref = f"pool{top}_tol{setup['tie_tolerance']:g}"
    if ref in ndcg:
        ids = sorted(ndcg[ref])
        results["paired_bootstrap_95"] = {
            f"ndcg@10: {name} - {ref}": paired_bootstrap([ndcg[name][i] for i in ids], [ndcg[ref][i] for i in ids])
            for name in ndcg
            if name != ref
        }
    results["seconds"] = clock.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-pool-size.json").write_text(json.dumps(results, indent=2, default=str))
    rows = []
    for f in results["variants"].values():
        qa = f["agreement"]["qa"]["rank"]
        rows.append(
            [
                f["pool"],
                f"{f['tie_tolerance']:g}",
                qa["tied_pair_share"],
                qa["no_signal"],
                qa["gold_first"],
                qa["mrr"],
                f.get("dev_ndcg@10"),
                f["mean_distinct_samples"],
                f["est_label_seconds_per_query"],
            ]
        )
    table = md_table(["pool", "tie tol", "tied pairs", "no signal", "gold first", "MRR", "dev nDCG@10",
                      "distinct samples", "est. label s/query"], rows)  # fmt: skip
    (args.out / "results-pool-size.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
