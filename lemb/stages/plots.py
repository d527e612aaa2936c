"""The run's plots, each drawn as soon as its data exists: the reward histogram when label finishes (in
<run>/label/), the training loss when train saves its model (in <run>/train/); eval's report draws both again."""

from __future__ import annotations

import json
from pathlib import Path

from lemb.files import atomic

REWARDS_PLOT = "rewards.png"
LOSS_PLOT = "loss.png"


def save_plot(out: Path, xlabel: str, ylabel: str, draw) -> Path:
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
    with atomic(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def plot_rewards(label_dir: Path, out: Path) -> Path | None:
    import polars as pl

    files = sorted(label_dir.glob("part-*.parquet"))
    if not files:
        return None
    df = pl.scan_parquet(files).select("task", "reward").filter(pl.col("reward").is_not_null()).collect()

    def draw(ax) -> None:
        for task in sorted(df["task"].unique().to_list()):
            values = df.filter(pl.col("task") == task)["reward"].to_numpy()
            ax.hist(values, bins=20, range=(0, 1), alpha=0.6, label=task)

    return save_plot(out, "rank-aware reward", "(query, candidate) pairs", draw)


def plot_loss(log_path: Path, out: Path) -> Path | None:
    if not log_path.exists():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]

    def draw(ax) -> None:
        for task in sorted({r["task"] for r in rows}):
            pts = [(r["step"], r["loss"]) for r in rows if r["task"] == task]
            ax.plot(*zip(*pts), marker=".", linestyle="-", label=task)

    return save_plot(out, "step", "training loss", draw)
