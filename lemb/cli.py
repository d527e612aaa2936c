"""The `lemb` command: one thin command per stage over importable functions (options and errors: commands.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from lemb.commands import default_note, name_value_pairs, stage_command, user_errors
from lemb.errors import LembError
from lemb.pipeline.config import IO, EvalConfig, LabelConfig, RetrieveConfig, TrainConfig
from lemb.stages.plots import LOSS_PLOT, REWARDS_PLOT

WORKFLOW = """A run, start to end (each command's --help lists all of its settings):

lemb convert nq_oracle --data ../shared/data --out data --limit 200 --dev-fraction 0.2

lemb retrieve --run runs/a --queries data/queries.jsonl --corpus data/corpus.jsonl

lemb label --run runs/a   (lemb label --run runs/a --dry-run: the plan and its cost first)

lemb train --run runs/a

lemb eval --run runs/a --queries data/dev.jsonl --corpus data/corpus.jsonl

lemb status runs/a   (what is done; a stopped stage resumes when run again)"""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, epilog=WORKFLOW,
                  help="LLM-aware retrieval embedders: retrieve, label, train, eval.")  # fmt: skip

Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars. " + default_note("false"))]
PIPELINE, RUNS, DEMO = "Stages, in the order a run takes them", "Look at and reuse a run", "Try it"


def _version(value: bool) -> None:
    if value:
        import lemb

        typer.echo(f"lemb {lemb.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print lemb's version and exit.")
    ] = False,
) -> None:
    """LLM-aware retrieval embedders: retrieve, label, train, eval."""


class _ConvertCommand(TyperCommand):
    """`lemb convert`, whose --help ends with the table of sources (read from lemb/data/convert.py when shown)."""

    @property
    def epilog(self) -> str:
        from lemb.data.convert import sources_help

        return sources_help()

    @epilog.setter
    def epilog(self, value: str | None) -> None:
        pass


@app.command(cls=_ConvertCommand, rich_help_panel=PIPELINE)
@user_errors
def convert(
    source: Annotated[
        list[str],
        typer.Argument(
            help="NAME or NAME:SPLIT (the sources are listed below), several mixed into one set.", show_default=False
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(help="Data root laid out like ../shared/data, or the source's own folder.", show_default=False),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder: queries.jsonl + corpus.jsonl (+ dev.jsonl), or <task>.json files.", show_default=False
        ),
    ],
    limit: Annotated[
        Optional[int], typer.Option(help="First N queries of each source. " + default_note("all"))
    ] = None,
    max_keys: Annotated[
        Optional[int],
        typer.Option(
            help="At most N keys per source; the kept queries' positives always stay. " + default_note("all")
        ),
    ] = None,
    split: Annotated[
        Optional[str], typer.Option(help="Split for sources named without one. " + default_note("the source's first"))
    ] = None,
    format: Annotated[str, typer.Option("--format", help="lemb or flagembedding (llm_embedder JSONL).")] = "lemb",
    dev_fraction: Annotated[
        Optional[float],
        typer.Option(
            help="Also hold out this fraction of the queries as dev.jsonl, by a stable hash of each query_id (the "
            "same id always falls on the same side). " + default_note("none")
        ),
    ] = None,
) -> None:
    """Real data of the six task kinds, FlagEmbedding llm_embedder files or a BEIR folder, as lemb records."""
    from lemb.data.convert import convert as run_convert

    result = run_convert(
        source, data, out, limit=limit, max_keys=max_keys, split=split, fmt=format, dev_fraction=dev_fraction
    )
    tasks = ", ".join(f"{t} {n}" for t, n in sorted(result["per_task"].items()))
    typer.echo(f"{result['queries']} queries ({tasks}), {result['keys']} keys in {out}")
    if result["dev"]:
        dev = ", ".join(f"{t} {n}" for t, n in sorted(result["dev_per_task"].items()))
        typer.echo(f"{result['dev']} held-out queries ({dev}) in {result['dev_path']}")


@app.command(rich_help_panel=PIPELINE)
@user_errors
@stage_command(RetrieveConfig)
def retrieve(cfg: RetrieveConfig, quiet: bool) -> None:
    """Embed keys and queries (task instructions prepended) and write faiss top-K candidate shards."""
    from lemb.stages.retrieve import retrieve as run_retrieve

    stats = run_retrieve(cfg, progress=not quiet)
    rows = int(stats["candidates"].get("rows_out", 0))
    typer.echo(f"candidates: {rows} rows in {Path(cfg.run) / 'retrieve' / 'candidates'}")


@app.command(rich_help_panel=PIPELINE)
@user_errors
@stage_command(LabelConfig)
def label(
    cfg: LabelConfig,
    quiet: bool,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan and its cost; write nothing. " + default_note("false"),
            rich_help_panel=IO,
        ),
    ] = False,
    calibrate: Annotated[
        int, typer.Option(help="Queries timed by --dry-run (0: counts only, no LLM).", rich_help_panel=IO)
    ] = 2,
) -> None:
    """Sample the LLM, score the desired output under each candidate, write rank-aware reward shards."""
    if dry_run:
        from lemb.stages.label_plan import format_plan, plan_label

        typer.echo(format_plan(plan_label(cfg, calibrate=calibrate)))
        return
    from lemb.stages.label import label as run_label

    stats = run_label(cfg, progress=not quiet)
    silent = stats.get("queries_skipped_no_competing_samples", 0) + stats.get("queries_skipped_no_target", 0)
    typer.echo(
        f"rewards: {int(stats.get('rows_out', 0))} rows, {int(stats.get('queries_labelled', 0))} queries labelled, "
        f"{int(silent)} without signal, in {Path(cfg.run) / 'label'} (histogram: {REWARDS_PLOT})"
    )


@app.command(rich_help_panel=PIPELINE)
@user_errors
@stage_command(TrainConfig)
def train(cfg: TrainConfig, quiet: bool) -> None:
    """Graded distillation of the embedder from the run's reward shards; saves <run>/train/model."""
    from lemb.trainer.recipe import train as run_train

    model = run_train(cfg, progress=not quiet)
    typer.echo(f"model: {model}  loss curve: {model.parent / LOSS_PLOT}")


@app.command("eval", rich_help_panel=PIPELINE)
@user_errors
@stage_command(EvalConfig)
def eval_(
    cfg: EvalConfig,
    quiet: bool,
    embedder: Annotated[
        Optional[list[str]],
        typer.Option(help="NAME=MODEL, repeatable. " + default_note("base and <run>/train/model"), rich_help_panel=IO),
    ] = None,
) -> None:
    """Each task's metrics (TaskSpec.metrics) for each embedder, base vs trained; writes <run>/eval/."""
    from lemb.trainer.evaluate import evaluate_run
    from lemb.trainer.report import table, task_tables

    metrics = evaluate_run(cfg, name_value_pairs(embedder, "--embedder", "NAME=MODEL") or None, progress=not quiet)
    typer.echo(table({n: m["all"] for n, m in metrics.items()}, list(metrics)))
    typer.echo("\n".join(task_tables(metrics)))


@app.command(rich_help_panel=RUNS)
@user_errors
def status(run: Annotated[Path, typer.Argument(help="Run folder.", show_default=False)]) -> None:
    """Which stages and shards of a run are done, pending or failed."""
    from lemb.pipeline.status import run_status

    typer.echo(run_status(run))


@app.command(rich_help_panel=RUNS)
@user_errors
def inspect(
    path: Annotated[
        Path, typer.Argument(help="A stage folder of shards (e.g. <run>/label) or one shard file.", show_default=False)
    ],
    top: Annotated[int, typer.Option(help="Examples shown at each end.")] = 3,
    agreement: Annotated[
        bool,
        typer.Option(
            "--agreement",
            help="For a label folder: how each reward agrees with the known positives, per task. "
            + default_note("false"),
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="With --agreement: write the report here. " + default_note("none"))
    ] = None,
) -> None:
    """A polars summary of a shard folder: rows, per-task counts, reward distribution, top and bottom rows."""
    if agreement:
        from lemb.stages.agreement import agreement_report

        typer.echo(agreement_report(path, json_out))
        return
    from lemb.pipeline.status import inspect_shards

    typer.echo(inspect_shards(path, top))


@app.command(rich_help_panel=RUNS)
@user_errors
def rescore(
    run: Annotated[Path, typer.Argument(help="Run folder with a finished label stage.")],
    reward: Annotated[str, typer.Option(help="rank | likelihood | improvement")] = "rank",
    tie_tolerance: Annotated[float, typer.Option(help="Scores this close to the target's tie (nats).")] = 1e-6,
) -> None:
    """Recompute rewards from the log-probabilities in the label shards (no LLM); writes <run>/rescore/<reward>/."""
    from lemb.stages.rescore import rescore as run_rescore

    s = run_rescore(run, reward, tie_tolerance, progress=True)
    means = ", ".join(f"{task} {value:.3f}" for task, value in s["mean_reward"].items()) or "none"
    typer.echo(f"{s['reward']} rewards: {s['rows']} rows ({s['rows_with_reward']} with signal; mean per task: {means})"
               f" in {s['out']}")  # fmt: skip


@app.command(rich_help_panel=RUNS)
@user_errors
def export(
    model: Annotated[Path, typer.Argument(help="A trained model folder, or a run folder (its train/model).")],
    out: Annotated[Path, typer.Option(help="New folder to write.")],
    format: Annotated[str, typer.Option("--format", help="flagembedding (llm_embedder's layout).")] = "flagembedding",
) -> None:
    """Write a trained model in another project's layout, with its task instructions."""
    from lemb.trainer.export import export as run_export

    path, flags = run_export(model, out, format)
    typer.echo(f"exported to {path}; FlagEmbedding flags: {flags}")


@app.command(rich_help_panel=RUNS)
@user_errors
def push(
    model: Annotated[
        Path, typer.Argument(help="A run folder (its train/model) or a trained model folder.", show_default=False)
    ],
    repo: Annotated[
        str, typer.Option(help="OWNER/NAME on the Hugging Face Hub; created if missing.", show_default=False)
    ],
    private: Annotated[
        bool,
        typer.Option(
            "--private", help="Create the repo private (an existing repo stays as it is). " + default_note("false")
        ),
    ] = False,
    revision: Annotated[
        Optional[str], typer.Option(help="Branch to push to, created if missing. " + default_note("main"))
    ] = None,
) -> None:
    """Upload a trained model with its model card to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    from lemb.trainer.push import push as run_push

    folder, url = run_push(model, repo, private=private, revision=revision)
    typer.echo(f"pushed {folder} to {url}")


@app.command(rich_help_panel=DEMO)
@user_errors
def demo(
    size: Annotated[str, typer.Option(help="tiny (about 3 minutes) or small.")] = "small",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo-out"),
    executor: Annotated[str, typer.Option(help="ray or local (in this process).")] = "ray",
    threads: Annotated[int, typer.Option(help="Torch threads per worker.")] = 1,
    quiet: Quiet = False,
) -> None:
    """The whole pipeline on the built-in demo world with the default models; prints base vs trained."""
    from lemb.trainer.report import table
    from lemb.workflow import DEMO_SETTINGS, run_demo

    if size not in DEMO_SETTINGS:
        raise LembError(f"--size must be one of {', '.join(DEMO_SETTINGS)}, got {size!r}")
    metrics = run_demo(size, out, executor=executor, threads=threads, progress=not quiet)
    typer.echo(
        "\nHeld-out demo queries, base vs trained embedder, each as it is meant to be used (the base without"
        " instructions, the trained model with those it saved):\n"
    )
    typer.echo(table({n: m["all"] for n, m in metrics.items()}, list(metrics)))
    typer.echo(f"\nreport: {out / 'report.md'}  metrics: {out / 'metrics.json'}")


def main() -> None:
    app(prog_name="lemb")


if __name__ == "__main__":
    sys.exit(main())
