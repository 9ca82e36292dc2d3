#!/usr/bin/env bash
# Train the reference LALM on CPU at demo size: OpenAI's pretrained Whisper tiny.en encoder (frozen, features
# computed once), a small random Qwen3, and the MoE adapter (preset moe-8c4 at d = 64).
#   bash examples/recipes/train_lalm_cpu.sh TRAIN.jsonl VAL.jsonl [OUT_DIR] [extra flags...]
# Manifest format: adapter/lalm/data.py. Flags: python -m adapter.lalm.train --help
set -euo pipefail
cd "$(dirname "$0")/../.."
TRAIN=${1:?train manifest}; VAL=${2:?val manifest}; OUT=${3:-runs/lalm-cpu}; shift $(( $# < 3 ? $# : 3 ))
exec .venv/bin/python -m adapter.lalm.train \
    --train-manifest "$TRAIN" --val-manifest "$VAL" --output-dir "$OUT" \
    --encoder tiny.en --llm tiny --tiny-llm-hidden 128 --tiny-llm-layers 2 \
    --adapter moe-8c4 --audio-dim 64 --semantic-codes 64 --adapter-backend torch \
    --max-steps 600 --lr 3e-3 --warmup-steps 20 --decay-fraction 0.2 \
    --max-batch-size 32 --max-batch-tokens 4096 --aux-lambda 0.01 \
    --eval-every 100 --save-every 100 "$@"
