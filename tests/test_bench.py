"""Every benchmark script runs, in a smoke mode of tiny sizes, so that an API change that breaks one fails here
(the figures themselves are BENCHMARKS.md's, measured at full size). The GPU scripts run up to the point where
they need CUDA. The experiments' scripts have their own end-to-end tests (tests/test_replicate.py,
test_fair_base.py, test_loss_settings.py, test_pool_size.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "knowledge_qa" / "nq_oracle"

pytestmark = pytest.mark.slow
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"the benchmark data is not at {DATA}")


def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


def _script(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    done = _run(sys.executable, f"bench/{name}.py", *args, "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_shard_checksum(tmp_path):
    done = _run(sys.executable, "bench/shard_checksum.py", "--mb", "1", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["rows"] > 0 and {"sha256", "crc32"} <= set(report["whole_file"])


@needs_data
def test_retrieve_throughput(tmp_path):
    report = _script(tmp_path, "retrieve_throughput", "--texts", "8", "--sizes", "200")
    assert report["encode"] and {r["kind"] for r in report["index"]} >= {"flat", "hnsw"}
    assert report["driver_memory"][0]["n"] == 200


@needs_data
def test_eval_reuse(tmp_path):
    report = _script(tmp_path, "eval_reuse", "--queries", "10", "--keys", "20", "--repeats", "1")
    assert report["same_metrics"] is True and set(report["median_s"]) == {"embedded", "reused"}


@needs_data
def test_train_throughput_lemb_variants(tmp_path):
    args = ["--steps", "3", "--batch", "2", "--group", "2", "--max-length", "32", "--lemb-only"]
    report = _script(tmp_path, "train_throughput", *args)
    assert report["lemb"]["examples_per_s"] > 0 and report["settings"]["steps"] == 3


@needs_data
def test_dev_eval_cost(tmp_path):
    args = [
        "--steps",
        "2",
        "--every",
        "1",
        "--batch",
        "2",
        "--dev-queries",
        "4",
        "--dev-keys",
        "12",
        "--max-length",
        "32",
    ]
    report = _script(tmp_path, "dev_eval_cost", *args)
    assert report["without_dev"]["evaluations"] == 0 and report["with_dev"]["evaluations"] == 2
    assert report["per_evaluation_s"] > 0 and len(report["with_dev"]["dev_ndcg@10"]) == 2


@needs_data
def test_train_throughput_against_sentence_transformers(tmp_path):
    pytest.importorskip("datasets", reason="the bench extra (datasets, accelerate) is not installed")
    report = _script(
        tmp_path, "train_throughput", "--steps", "3", "--batch", "2", "--group", "2", "--max-length", "32"
    )
    assert report["ratio"] > 0 and report["sentence_transformers"]["examples_per_s"] > 0


@needs_data
def test_gpu_step_check_on_cpu():
    done = _run(sys.executable, "bench/gpu_step_check.py", "--device", "cpu", "--queries", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] is True


@needs_data
def test_label_throughput(tmp_path):
    args = ["--queries", "1", "--candidates", "1", "--samples", "2", "--variants", "naive,transformers"]
    report = _script(tmp_path, "label_throughput", *args)
    assert set(report["variants"]) == {"naive", "transformers"}
    assert all(v["pairs_per_s"] > 0 for v in report["variants"].values())
    assert report["max_abs_logprob_diff"] < 1e-3  # the two scorers agree on the same continuations


def test_scale(tmp_path):
    args = ["--sizes", "20", "--label-max", "20", "--workdir", str(tmp_path / "work"), "--clean"]
    report = _script(tmp_path, "scale", *args)
    assert report["sizes"] == [20] and report["stages"]["label"]["20"]["rows"] > 0
    assert set(report["stages"]) >= {"retrieve", "label", "train"}


@needs_data
@pytest.mark.parametrize("script", ["gpu_train.sh", "gpu_label.sh"])
def test_gpu_scripts_run_up_to_cuda(tmp_path, script):
    """With a stand-in `nvidia-smi` on PATH, the script gets as far as its first CUDA check, and stops there."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'no GPU, 0 MiB, none'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": sys.executable, "DATA": str(DATA)}
    done = _run("bash", f"bench/{script}", str(tmp_path / "out"), env=env)
    assert done.returncode != 0
    assert "no CUDA device visible" in done.stderr or "torch.cuda" in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "out" / "gpu.txt").read_text().startswith("no GPU")
