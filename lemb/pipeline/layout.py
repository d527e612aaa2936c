"""Where a run keeps each stage's output: the one place that spells the layout of a run folder.

    <run>/retrieve/keys/         key embeddings (part-*.parquet, their stats, _manifest.json)
    <run>/retrieve/candidates/   each query's top-K candidates: label's input
    <run>/label/                 reward shards: train's input (rewards.png, the histogram)
    <run>/rescore/<reward>/      the label shards' rows under another reward
    <run>/train/                 model/, log.jsonl, loss.png, _stats.json, checkpoint.pt while unfinished;
                                 model-merged/ with --lora --merge
    <run>/eval/                  metrics.json, report.md, details.json; eval/<name>/ each embedder's ranking

A stage asks the layout for another stage's folder and reads what that stage declares as its output (its manifest,
shards and stats), never that stage's settings file.
"""

from __future__ import annotations

from pathlib import Path

from lemb.pipeline.shards import MANIFEST, STATS


class RunLayout:
    """The folders and files of the run folder `run`."""

    def __init__(self, run: str | Path) -> None:
        self.run = Path(run)

    @property
    def retrieve(self) -> Path:
        return self.run / "retrieve"

    @property
    def keys(self) -> Path:
        return self.keys_in(self.retrieve)

    @property
    def candidates(self) -> Path:
        return self.candidates_in(self.retrieve)

    @staticmethod
    def keys_in(retrieve_dir: Path) -> Path:
        """The key embeddings of a retrieve folder: the run's, or one of eval's rankings."""
        return Path(retrieve_dir) / "keys"

    @staticmethod
    def candidates_in(retrieve_dir: Path) -> Path:
        return Path(retrieve_dir) / "candidates"

    @property
    def label(self) -> Path:
        return self.run / "label"

    def rescore(self, reward: str) -> Path:
        return self.run / "rescore" / reward

    @property
    def train(self) -> Path:
        return self.run / "train"

    @property
    def model(self) -> Path:
        """The trained model: a sentence-transformers folder."""
        return self.model_in(self.train)

    @staticmethod
    def model_in(train_dir: Path) -> Path:
        return Path(train_dir) / "model"

    @property
    def merged_model(self) -> Path:
        """The trained model with its LoRA adapters merged into the base (`lemb train --lora --merge`)."""
        return self.train / "model-merged"

    @property
    def train_log(self) -> Path:
        return self.train / "log.jsonl"

    @property
    def train_stats(self) -> Path:
        return self.train / STATS

    @property
    def eval(self) -> Path:
        return self.run / "eval"

    def ranking(self, name: str) -> Path:
        """Eval's ranking of the held-out queries by the embedder `name`: a retrieve run of its own."""
        return self.eval / name

    @staticmethod
    def manifest(stage_dir: Path) -> Path:
        return Path(stage_dir) / MANIFEST
