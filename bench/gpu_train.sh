#!/usr/bin/env bash
# Trainer throughput on one GPU, bf16, in under 8 minutes: lemb vs sentence-transformers (same model, data,
# batch, steps), then lemb with gradient cache and gradient checkpointing at a large batch, after a check that
# the GPU step paths give the same gradients. Needs the `bench` extra; run from the repository root:
#
#   bash bench/gpu_train.sh [OUT_DIR]
#
# MODEL: the embedder (default: lemb's default; a bge-base-sized folder suits a GPU better).
# RANDOM_INIT=1: the model's architecture from its config with fresh weights (throughput does not depend on them).
# DATA: a folder with corpus.jsonl and queries.jsonl (default ../shared/data/knowledge_qa/nq_oracle).
set -euo pipefail
OUT=${1:-bench-gpu-out}
MODEL=${MODEL:-all-minilm-l6-v2}
DATA=${DATA:-../shared/data/knowledge_qa/nq_oracle}
PY=${PYTHON:-python3}
INIT=()
if [[ "${RANDOM_INIT:-0}" == 1 ]]; then INIT=(--random-init); fi
COMMON=(--model "$MODEL" "${INIT[@]}" --data "$DATA" --device cuda --precision bf16 --max-length 256 --group 8)
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, sentence_transformers as st; assert torch.cuda.is_available(), 'no CUDA device \
visible'; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', \
st.__version__)" | tee -a "$OUT/gpu.txt"

echo "== step paths agree on the GPU"
$PY bench/gpu_step_check.py --model "$MODEL" "${INIT[@]}" --data "$DATA" | tee "$OUT/step_check.json"

echo "== lemb vs sentence-transformers, bf16, 64 queries x 8 keys"
$PY bench/train_throughput.py "${COMMON[@]}" --batch 64 --steps 10 --json "$OUT/train_bf16.json"

echo "== lemb alone: plain / gradient cache / + checkpointing, 128 queries x 8 keys"
$PY bench/train_throughput.py "${COMMON[@]}" --batch 128 --steps 4 --chunk 32 --lemb-only \
    --json "$OUT/train_bf16_large.json"
