#!/usr/bin/env bash
# Reward-labelling throughput on one GPU, in under 8 minutes: bench/label_throughput.py (naive transformers scoring,
# lemb's transformers backend, lemb's vLLM backend) with a larger LLM. Needs an environment with lemb and the `vllm`
# extra (PyPI vllm, which brings its CUDA torch):
#
#   python -m venv .venv-gpu && .venv-gpu/bin/pip install -e '.[vllm]'
#   PYTHON=.venv-gpu/bin/python bash bench/gpu_label.sh [OUT_DIR]
#
# LLM: a hub id (needs network access) or a local model folder (default Qwen/Qwen2.5-1.5B-Instruct).
# DTYPE: bfloat16 (default; the two backends then differ by bf16 rounding, ~1e-2 nats, not the 1e-3 of float32)
#        or float32 (for the parity number).
# QUERIES: questions in the workload (default 64: 256 (query, candidate) pairs, 9 continuations each).
# RANDOM_INIT=1: LLM is a folder with only config.json and the tokenizer; the weights are fresh (no download).
# VARIANTS: default naive,transformers,vllm; without vllm installed, naive,transformers (said in gpu.txt).
# DATA: a folder with corpus.jsonl and queries.jsonl (default ../shared/data/knowledge_qa/nq_oracle).
set -euo pipefail
OUT=${1:-bench-gpu-label-out}
LLM=${LLM:-Qwen/Qwen2.5-1.5B-Instruct}
DTYPE=${DTYPE:-bfloat16}
QUERIES=${QUERIES:-64}
DATA=${DATA:-../shared/data/knowledge_qa/nq_oracle}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
VARIANTS=${VARIANTS:-naive,transformers,vllm}
if ! $PY -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null | tee -a "$OUT/gpu.txt"; then
  echo "vllm is not installed: the vllm variant is left out" | tee -a "$OUT/gpu.txt"
  VARIANTS=${VARIANTS//,vllm/}
fi
INIT=()
if [[ "${RANDOM_INIT:-0}" == 1 ]]; then INIT=(--random-init); fi

echo "== label throughput: $LLM, $DTYPE, $QUERIES queries x 4 candidates x 8 samples"
# the whole benchmark is bounded: model download and vLLM's CUDA-graph capture included
timeout 450 $PY bench/label_throughput.py --llm "$LLM" "${INIT[@]}" --dtype "$DTYPE" --queries "$QUERIES" \
  --data "$DATA" --variants "$VARIANTS" --json "$OUT/label_gpu.json" | tee "$OUT/label_gpu.log"
$PY - "$OUT/label_gpu.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, v in r["variants"].items():
    print(f"{name:13s} {v['pairs_per_s']:9.2f} pairs/s  {v['tokens_per_s']:11.0f} tokens/s  "
          f"x{v['speedup_vs_naive'] or 0:6.2f} vs naive  flops_fraction {v['flops_fraction']:.3f}")
print("max_abs_logprob_diff", r["max_abs_logprob_diff"])
PY
