"""metrics.json, report.md and PNG plots of an evaluated run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lemb.data.tasks import task_spec
from lemb.files import write_json

HEADLINE = ("recall@1", "recall@5", "mrr@10", "ndcg@10", "answer_accuracy", "answer_em")


def metrics_json(
    metrics: dict[str, dict[str, dict[str, float]]], embedded_with: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """{"base": {"recall@1": ..., "per_task": {...}, "embedded_with": {...}}, "trained": {...}}: headline numbers
    over all queries, and what each embedder was embedded with (model, instructions, key template)."""
    embedded_with = embedded_with or {}
    return {
        name: {**by_task["all"], "per_task": {t: m for t, m in by_task.items() if t != "all"}}
        | ({"embedded_with": embedded_with[name]} if name in embedded_with else {})
        for name, by_task in metrics.items()
    }


def embedders_table(embedded_with: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: each embedder's model, instructions (preset name and where they came from), key template."""
    lines = ["| embedder | model | instructions | key template |", "|---|---|---|---|"]
    for name, e in embedded_with.items():
        instructions = f"{e['instructions']['name']}: {e['instructions']['source']}"
        lines.append(f"| {name} | `{e['model']}` | {instructions} | `{e['key_template']}` |")
    return lines


def table(metrics: dict[str, dict[str, float]], names: list[str], rows: tuple[str, ...] = HEADLINE) -> str:
    """One row per metric in `rows` that some embedder has, one column per embedder."""
    cols = [m for m in rows if any(m in metrics[n] for n in names)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in cols:
        lines.append(f"| {m} | " + " | ".join(f"{metrics[n].get(m, float('nan')):.3f}" for n in names) + " |")
    return "\n".join(lines)


def task_tables(metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown lines: a heading and a table per task, with the task's own metrics (`TaskSpec.metrics`)."""
    names = list(metrics)
    lines: list[str] = []
    for task in sorted({t for n in names for t in metrics[n] if t != "all"}):
        rows = task_spec(task).metrics
        lines += ["", f"## {task} ({metrics[names[0]][task]['queries']} queries)", ""]
        lines.append(table({n: metrics[n][task] for n in names}, names, rows))
        if "perplexity" in rows:
            lines += ["", "perplexity: lower is better."]
    return lines


def _save_plot(out: Path, xlabel: str, ylabel: str, draw) -> Path:
    """One 6x3.5-inch PNG; `draw(ax)` adds the series, each labelled by task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_rewards(label_dir: Path, out: Path) -> Path | None:
    import polars as pl

    files = sorted(label_dir.glob("part-*.parquet"))
    if not files:
        return None
    df = pl.read_parquet(files).filter(pl.col("reward").is_not_null())

    def draw(ax) -> None:
        for task in sorted(df["task"].unique().to_list()):
            values = df.filter(pl.col("task") == task)["reward"].to_numpy()
            ax.hist(values, bins=20, range=(0, 1), alpha=0.6, label=task)

    return _save_plot(out, "rank-aware reward", "(query, candidate) pairs", draw)


def plot_loss(log_path: Path, out: Path) -> Path | None:
    if not log_path.exists():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]

    def draw(ax) -> None:
        for task in sorted({r["task"] for r in rows}):
            pts = [(r["step"], r["loss"]) for r in rows if r["task"] == task]
            ax.plot(*zip(*pts), marker=".", linestyle="-", label=task)

    return _save_plot(out, "step", "training loss", draw)


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
        ("rewards_plot", plot_rewards(run / "label", out / "rewards.png")),
        ("loss_plot", plot_loss(run / "train" / "log.jsonl", out / "loss.png")),
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
    if embedded_with:
        lines += ["", "Each embedder as it is meant to be used (`instructions: auto`) unless set otherwise:",
                  "", *embedders_table(embedded_with)]  # fmt: skip
    lines += task_tables(metrics)
    for key, title in (("rewards_plot", "Reward distribution"), ("loss_plot", "Training loss")):
        if key in paths:
            lines += ["", f"## {title}", "", f"![{title}]({paths[key].name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return paths
