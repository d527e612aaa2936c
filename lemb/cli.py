"""The `lemb` command: one thin command per stage over importable functions.

User mistakes (bad input, bad settings, a conflicting earlier run) print one line and exit 1.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lemb.errors import Interrupted, LembError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LLM-aware retrieval embedders: retrieve, label, train, eval.",
)
log = logging.getLogger("lemb")

Run = Annotated[Optional[str], typer.Option("--run", help="Run folder; each stage writes <run>/<stage>/.")]
Config = Annotated[Optional[Path], typer.Option("--config", help="YAML file of settings (flags win).")]
Executor = Annotated[Optional[str], typer.Option(help="ray (default) or local (in-process).")]
Address = Annotated[Optional[str], typer.Option(help="Ray cluster address; default starts a local cluster.")]
Workers = Annotated[Optional[int], typer.Option(help="Actors in the pool (one model copy each).")]
Threads = Annotated[Optional[int], typer.Option(help="Torch threads per worker (1 is fastest on 2 vCPUs).")]
Shards = Annotated[Optional[int], typer.Option(help="Output shards (the unit of work and of resume).")]
Restart = Annotated[Optional[bool], typer.Option("--restart", help="Discard earlier output made with other settings.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lemb.pipeline.executor import quiet_libraries

        quiet_libraries()
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except (LembError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            # Ray's blocking calls re-raise a plain KeyboardInterrupt for any signal: the handler noted which
            signum = exc.signum if isinstance(exc, Interrupted) else (_RECEIVED[-1] if _RECEIVED else signal.SIGINT)
            name = signal.Signals(signum).name
            typer.echo(f"interrupted ({name}): finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(128 + signum) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


_RECEIVED: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def _common(run, executor, address, workers, threads, shards, restart) -> dict[str, Any]:
    return dict(
        run=run, executor=executor, address=address, workers=workers, threads=threads, shards=shards, restart=restart
    )


@app.command()
@_user_errors
def retrieve(
    queries: Annotated[Optional[str], typer.Option(help="Query records (JSONL or Parquet).")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Key records (JSONL or Parquet).")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="HF id, local path or lemb default name.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Candidates per query.")] = None,
    run: Run = None,
    config: Config = None,
    executor: Executor = None,
    address: Address = None,
    workers: Workers = None,
    threads: Threads = None,
    shards: Shards = None,
    restart: Restart = None,
    quiet: Quiet = False,
) -> None:
    """Embed keys and queries (task instructions prepended) and write faiss top-K candidate shards."""
    from lemb.pipeline.config import RetrieveConfig, load_config
    from lemb.stages.retrieve import retrieve as run_retrieve

    cfg = load_config(
        RetrieveConfig,
        config,
        queries=queries,
        corpus=corpus,
        embedder=embedder,
        top_k=top_k,
        **_common(run, executor, address, workers, threads, shards, restart),
    )
    stats = run_retrieve(cfg, progress=not quiet)
    typer.echo(
        f"candidates: {int(stats['candidates'].get('rows_out', 0))} rows"
        f" in {Path(cfg.run) / 'retrieve' / 'candidates'}"
    )


@app.command()
@_user_errors
def label(
    llm: Annotated[Optional[str], typer.Option(help="LLM: HF id, local path or lemb default name.")] = None,
    n_samples: Annotated[Optional[int], typer.Option(help="N samples from the prompt without candidate.")] = None,
    per_candidate_samples: Annotated[
        Optional[int], typer.Option(help="m samples from each candidate's prompt.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    backend: Annotated[Optional[str], typer.Option(help="vllm (default where installed) | transformers.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and its cost (from a short calibration); write nothing.")
    ] = False,
    calibrate: Annotated[int, typer.Option(help="Queries timed by --dry-run (0: counts only, no LLM).")] = 2,
    run: Run = None,
    config: Config = None,
    executor: Executor = None,
    address: Address = None,
    workers: Workers = None,
    threads: Threads = None,
    shards: Shards = None,
    restart: Restart = None,
    quiet: Quiet = False,
) -> None:
    """Sample the LLM, score the desired output under each candidate, write rank-aware reward shards."""
    from lemb.pipeline.config import LabelConfig, load_config
    from lemb.stages.label import label as run_label

    cfg = load_config(
        LabelConfig,
        config,
        llm=llm,
        n_samples=n_samples,
        per_candidate_samples=per_candidate_samples,
        seed=seed,
        backend=backend,
        **_common(run, executor, address, workers, threads, shards, restart),
    )
    if dry_run:
        from lemb.stages.label_plan import format_plan, plan_label

        typer.echo(format_plan(plan_label(cfg, calibrate=calibrate)))
        return
    stats = run_label(cfg, progress=not quiet)
    typer.echo(
        f"rewards: {int(stats.get('rows_out', 0))} rows, {int(stats.get('queries_labelled', 0))} queries labelled, "
        f"{int(stats.get('queries_skipped_no_competing_samples', 0) + stats.get('queries_skipped_no_target', 0))} "
        f"without signal, in {Path(cfg.run) / 'label'}"
    )


@app.command()
@_user_errors
def train(
    embedder: Annotated[Optional[str], typer.Option(help="Embedder to start from.")] = None,
    steps: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Queries per one-task batch.")] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    reward: Annotated[Optional[str], typer.Option(help="rank | likelihood | improvement")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (0: never).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the last checkpoint.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16 | fp16 autocast of the encoder.")] = None,
    grad_chunk: Annotated[Optional[int], typer.Option(help="Queries per gradient-cache chunk (0: off).")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool], typer.Option("--gradient-checkpointing", help="Recompute activations in backward.")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
    run: Run = None,
    config: Config = None,
    threads: Threads = None,
    restart: Annotated[
        Optional[bool], typer.Option("--restart", help="Discard an earlier or unfinished training run of this folder.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Graded distillation of the embedder from the run's reward shards; saves <run>/train/model."""
    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.trainer.recipe import train as run_train

    cfg = load_config(
        TrainConfig,
        config,
        embedder=embedder,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        reward=reward,
        save_every=save_every,
        resume=resume,
        precision=precision,
        grad_chunk=grad_chunk,
        gradient_checkpointing=gradient_checkpointing,
        device=device,
        run=run,
        threads=threads,
        restart=restart,
    )
    path = run_train(cfg, progress=not quiet)
    typer.echo(f"model: {path}")


@app.command()
@_user_errors
def export(
    model: Annotated[Path, typer.Argument(help="A trained model folder, or a run folder (its train/model).")],
    out: Annotated[Path, typer.Option(help="New folder to write.")],
    format: Annotated[str, typer.Option("--format", help="flagembedding (llm_embedder's layout).")] = "flagembedding",
) -> None:
    """Write a trained model in another project's layout, with its task instructions."""
    import json

    from lemb.trainer.export import FORMATS, export_flagembedding

    if format not in FORMATS:
        raise LembError(f"--format {format!r}: known formats are {', '.join(FORMATS)}")
    path = export_flagembedding(model, out)
    flags = json.loads((path / "export.json").read_text())["flags"]
    typer.echo(f"exported to {path}; FlagEmbedding flags: {flags}")


@app.command("eval")
@_user_errors
def eval_(
    queries: Annotated[Optional[str], typer.Option(help="Held-out query records.")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Key records.")] = None,
    embedder: Annotated[
        Optional[list[str]], typer.Option(help="NAME=MODEL, repeatable; default: base and trained.")
    ] = None,
    answer_k: Annotated[
        Optional[int], typer.Option(help="Retrieved candidates in the LLM prompt (0: no LLM).")
    ] = None,
    run: Run = None,
    config: Config = None,
    executor: Executor = None,
    workers: Workers = None,
    threads: Threads = None,
    shards: Shards = None,
    quiet: Quiet = False,
) -> None:
    """Each task's metrics (TaskSpec.metrics) for each embedder, base vs trained; writes <run>/eval/."""
    from lemb.pipeline.config import EvalConfig, load_config
    from lemb.trainer.report import table, task_tables
    from lemb.workflow import evaluate_run

    named = {}
    for item in embedder or []:
        name, sep, model = item.partition("=")
        if not sep:
            raise LembError(f"--embedder {item!r}: expected NAME=MODEL")
        named[name] = model
    cfg = load_config(
        EvalConfig, config, queries=queries, corpus=corpus, answer_k=answer_k, run=run, executor=executor,
        workers=workers, threads=threads, shards=shards,
    )  # fmt: skip
    metrics = evaluate_run(cfg, named or None, progress=not quiet)
    typer.echo(table({n: m["all"] for n, m in metrics.items()}, list(metrics)))
    typer.echo("\n".join(task_tables(metrics)))


@app.command()
@_user_errors
def convert(
    source: Annotated[
        list[str],
        typer.Argument(
            help="NAME or NAME:SPLIT, several mixed into one set: nq_oracle, sst2, trec, cb, rte, msc, gutenberg,"
            " gorilla, toolalpaca, trec_cast, flagembedding (splits: lemb/data/convert.py SOURCES)."
        ),
    ],
    data: Annotated[Path, typer.Option(help="Data root laid out like ../shared/data, or the source's own folder.")],
    out: Annotated[Path, typer.Option(help="Output folder: queries.jsonl + corpus.jsonl, or <task>.json files.")],
    limit: Annotated[Optional[int], typer.Option(help="First N queries of each source.")] = None,
    max_keys: Annotated[
        Optional[int], typer.Option(help="At most N keys per source; the kept queries' positives always stay.")
    ] = None,
    split: Annotated[Optional[str], typer.Option(help="Split for sources named without one.")] = None,
    format: Annotated[str, typer.Option("--format", help="lemb or flagembedding (llm_embedder JSONL).")] = "lemb",
) -> None:
    """Real data of the six task kinds, or FlagEmbedding llm_embedder files, as lemb records."""
    from lemb.data.convert import convert as run_convert

    result = run_convert(source, data, out, limit=limit, max_keys=max_keys, split=split, fmt=format)
    tasks = ", ".join(f"{t} {n}" for t, n in sorted(result["per_task"].items()))
    typer.echo(f"{result['queries']} queries ({tasks}), {result['keys']} keys in {out}")


@app.command()
@_user_errors
def rescore(
    run: Annotated[Path, typer.Argument(help="Run folder with a finished label stage.")],
    reward: Annotated[str, typer.Option(help="rank | likelihood | improvement")] = "rank",
    tie_tolerance: Annotated[float, typer.Option(help="Scores this close to the target's tie (nats).")] = 1e-6,
) -> None:
    """Recompute rewards from the log-probabilities in the label shards (no LLM); writes <run>/rescore/<reward>/."""
    from lemb.stages.rescore import rescore as run_rescore

    summary = run_rescore(run, reward, tie_tolerance)
    means = ", ".join(f"{task} {value:.3f}" for task, value in summary["mean_reward"].items())
    typer.echo(
        f"{summary['reward']} rewards: {summary['rows']} rows ({summary['rows_with_reward']} with signal; "
        f"mean per task: {means or 'none'}) in {summary['out']}"
    )


@app.command()
@_user_errors
def inspect(
    path: Path,
    top: Annotated[int, typer.Option(help="Examples shown at each end.")] = 3,
    agreement: Annotated[
        bool, typer.Option(help="For a label folder: how each reward agrees with the known positives, per task.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="With --agreement: write the report here.")] = None,
) -> None:
    """A polars summary of a shard folder: rows, per-task counts, reward distribution, top and bottom rows."""
    if agreement:
        from lemb.files import write_json
        from lemb.stages.agreement import agreement as measure
        from lemb.stages.agreement import agreement_table

        report = measure(path)
        typer.echo(agreement_table(report))
        if json_out:
            write_json(json_out, report)
        return
    from lemb.pipeline.status import inspect_shards

    typer.echo(inspect_shards(path, top))


@app.command()
@_user_errors
def status(run: Path) -> None:
    """Which stages and shards of a run are done, pending or failed."""
    from lemb.pipeline.status import run_status

    typer.echo(run_status(run))


@app.command()
@_user_errors
def demo(
    size: Annotated[str, typer.Option(help="tiny (about 3 minutes) or small.")] = "small",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo-out"),
    executor: Executor = "ray",
    threads: Annotated[int, typer.Option()] = 1,
    quiet: Quiet = False,
) -> None:
    """The whole pipeline on the built-in demo world with the default models; prints base vs trained."""
    from lemb.trainer.report import table
    from lemb.workflow import DEMO_SETTINGS, run_demo

    if size not in DEMO_SETTINGS:
        raise LembError(f"--size must be one of {', '.join(DEMO_SETTINGS)}, got {size!r}")
    metrics = run_demo(size, out, executor=executor or "ray", threads=threads, progress=not quiet)
    typer.echo("\nHeld-out demo queries, base vs trained embedder:\n")
    typer.echo(table({n: m["all"] for n, m in metrics.items()}, list(metrics)))
    typer.echo(f"\nreport: {out / 'report.md'}  metrics: {out / 'metrics.json'}")


def main() -> None:
    app(prog_name="lemb")


if __name__ == "__main__":
    sys.exit(main())
