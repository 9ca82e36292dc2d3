#!/usr/bin/env bash
# The paper's setting (section 4.1, Table 4) on GPUs: Whisper large-v3 encoder (frozen) from a local
# checkpoint file, Qwen3-1.7B from a local directory, d = 2560, MoE adapter 8 experts top-4 with the
# aggregation block, AdamW (0.9, 0.95), Warmup-Stable-Decay with peak lr 1e-5 and 20 warmup steps,
# bf16 autocast, the fused Triton kernels. Nothing is downloaded: give local paths. On a GPU without
# bf16 (T4, V100) add --fp16 (fp16 autocast with a loss scale; it replaces --bf16).
#   NPROC=8 bash examples/recipes/train_lalm_gpu.sh WHISPER.pt QWEN3_DIR TRAIN.jsonl VAL.jsonl [OUT] [flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
WHISPER=${1:?whisper large-v3 .pt}; QWEN=${2:?Qwen3-1.7B directory}; TRAIN=${3:?train manifest}
VAL=${4:?val manifest}; OUT=${5:-runs/lalm-gpu}; shift $(( $# < 5 ? $# : 5 ))
# The frozen encoder's features go to FEATURES (default data/features), on a filesystem every process
# sees: each clip encoded once over the processes, none held in memory (0.9 GB per hour of audio).
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-1}" -m adapter.lalm.train \
    --train-manifest "$TRAIN" --val-manifest "$VAL" --output-dir "$OUT" \
    --encoder "$WHISPER" --llm "$QWEN" --tokenizer "$QWEN" \
    --adapter moe-8c4 --audio-dim 2560 --semantic-codes 1024 --adapter-backend auto \
    --lr 1e-5 --warmup-steps 20 --decay-fraction 0.1 --beta1 0.9 --beta2 0.95 --grad-clip 1.0 \
    --max-steps 20000 --max-batch-tokens 16384 --max-batch-size 64 --grad-accum 4 \
    --aux-lambda 0.01 --bf16 --eval-every 1000 --save-every 1000 \
    --feature-cache "${FEATURES:-data/features}" "$@"
