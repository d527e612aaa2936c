"""metrics.json, report.md and PNG plots of an evaluated run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lemb.data.tasks import task_spec
from lemb.files import write_json
from lemb.pipeline.layout import RunLayout
from lemb.stages.plots import LOSS_PLOT, REWARDS_PLOT, plot_loss, plot_rewards
from lemb.trainer.bootstrap import INTERVALS, RESAMPLES

HEADLINE = ("recall@1", "recall@5", "mrr@10", "ndcg@10", "answer_accuracy", "answer_em")


def metrics_json(
    metrics: dict[str, dict[str, dict[str, Any]]], embedded_with: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """{"base": {"recall@1": ..., "per_task": {...}, "embedded_with": {...}}, "trained": {..., INTERVALS: {"against":
    "base", "resamples": 2000, "all": {metric: {"diff", "lo", "hi", "n"}}, "per_task": {...}}}}: headline numbers over
    all queries, what each embedder was embedded with (model, instructions, key template) and, for each embedder
    compared with the reference, each metric's difference, its 95% interval and the number of queries paired."""
    embedded_with = embedded_with or {}
    out = {}
    for name, by_task in metrics.items():
        rows = {t: {k: v for k, v in m.items() if k != INTERVALS} for t, m in by_task.items()}
        out[name] = {**rows["all"], "per_task": {t: m for t, m in rows.items() if t != "all"}}
        if name in embedded_with:
            out[name]["embedded_with"] = embedded_with[name]
        if INTERVALS in by_task["all"]:
            compared = {t: m[INTERVALS]["metrics"] for t, m in by_task.items() if INTERVALS in m}
            out[name][INTERVALS] = {"against": by_task["all"][INTERVALS]["against"], "resamples": RESAMPLES,
                                    "all": compared.pop("all"), "per_task": compared}  # fmt: skip
    return out


def embedders_table(embedded_with: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: each embedder's model, instructions (preset name and where they came from), key template."""
    lines = ["| embedder | model | instructions | key template |", "|---|---|---|---|"]
    for name, e in embedded_with.items():
        instructions = f"{e['instructions']['name']}: {e['instructions']['source']}"
        lines.append(f"| {name} | `{e['model']}` | {instructions} | `{e['key_template']}` |")
    return lines


def table(metrics: dict[str, dict[str, Any]], names: list[str], rows: tuple[str, ...] = HEADLINE) -> str:
    """One row per metric in `rows` that some embedder has, one column per embedder, then one per embedder compared
    with the reference: the difference, its paired bootstrap 95% interval and (the number of queries paired)."""
    shown = [m for m in rows if any(m in metrics[n] for n in names)]
    compared = [n for n in names if INTERVALS in metrics[n]]
    header = names + [f"{n} - {metrics[n][INTERVALS]['against']}, 95% interval (queries)" for n in compared]
    lines = ["| metric | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for m in shown:
        cells = [f"{metrics[n].get(m, float('nan')):.3f}" for n in names]
        cells += [_interval(metrics[n][INTERVALS]["metrics"].get(m)) for n in compared]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(found: dict[str, float] | None) -> str:
    if found is None:
        return ""
    return f"{found['diff']:+.3f} [{found['lo']:+.3f}, {found['hi']:+.3f}] ({found['n']})"


def task_tables(metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown lines: a heading and a table per task, with the task's own metrics (`TaskSpec.metrics`)."""
    names = list(metrics)
    lines: list[str] = []
    for task in sorted({t for n in names for t in metrics[n] if t != "all"}):
        rows = task_spec(task).metrics
        count = metrics[names[0]][task]["queries"]
        lines += ["", f"## {task} ({count} quer{'y' if count == 1 else 'ies'})", ""]
        lines.append(table({n: metrics[n][task] for n in names}, names, rows))
        if "perplexity" in rows:
            lines += ["", "perplexity: lower is better."]
    return lines


def write_report(
    run: Path,
    out: Path,
    metrics: dict[str, dict[str, dict[str, float]]],
    embedded_with: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, report.md and the plots into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(metrics)
    write_json(out / "metrics.json", metrics_json(metrics, embedded_with))
    paths = {"metrics": out / "metrics.json", "report": out / "report.md"}
    for key, path in (
        ("rewards_plot", plot_rewards(RunLayout(run).label, out / REWARDS_PLOT)),
        ("loss_plot", plot_loss(RunLayout(run).train_log, out / LOSS_PLOT)),
    ):
        if path:
            paths[key] = path
    lines = [
        "# lemb evaluation",
        "",
        f"Run: `{run}`",
        "",
        "## All held-out queries",
        "",
        table({n: metrics[n]["all"] for n in names}, names),
    ]
    if any(INTERVALS in metrics[n]["all"] for n in names):
        lines += ["", "The last columns: the difference of each metric from the reference embedder's on the same "
                  f"queries, its 95% interval by a paired bootstrap ({RESAMPLES:,} draws of the queries) and the "
                  "number of queries paired."]  # fmt: skip
    if embedded_with:
        lines += ["", "Each embedder as it is meant to be used (`instructions: auto`) unless set otherwise:",
                  "", *embedders_table(embedded_with)]  # fmt: skip
    lines += task_tables(metrics)
    for key, title in (("rewards_plot", "Reward distribution"), ("loss_plot", "Training loss")):
        if key in paths:
            lines += ["", f"## {title}", "", f"![{title}]({paths[key].name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return paths
