#!/usr/bin/env bash
# The reference LALM on several nodes with FSDP2 (parameters, gradients and AdamW state sharded over
# every GPU), sharded checkpoints and the balance loss over the global batch: a backbone whose
# training state does not fit one GPU (Qwen3-4B / 8B: `python -m adapter.lalm.studies.memory`).
# Run the same command on every node; torchrun's c10d rendezvous on MASTER (host:port of any one
# node, reachable from all) pairs them up. OUT must be on a filesystem every node sees: each rank
# writes its shards of every checkpoint there, and --resume may run on another number of GPUs.
#   NNODES=2 NPROC=8 MASTER=node0:29500 JOB=lalm-8b \
#     bash examples/recipes/train_lalm_multinode.sh WHISPER.pt QWEN3_DIR TRAIN.jsonl VAL.jsonl [OUT] [flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
WHISPER=${1:?whisper large-v3 .pt}; QWEN=${2:?Qwen3 directory}; TRAIN=${3:?train manifest}
VAL=${4:?val manifest}; OUT=${5:-runs/lalm-multinode}; shift $(( $# < 5 ? $# : 5 ))
# The frozen encoder's features go to FEATURES (default data/features): put it where every node sees
# it, or each node encodes the clips its folder lacks; none are held in memory (0.9 GB per hour).
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m torch.distributed.run --nnodes "${NNODES:?number of nodes}" --nproc_per_node "${NPROC:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER:?host:port of the rendezvous}" --rdzv_id "${JOB:-lalm}" \
    -m adapter.lalm.train \
    --train-manifest "$TRAIN" --val-manifest "$VAL" --output-dir "$OUT" \
    --encoder "$WHISPER" --llm "$QWEN" --tokenizer "$QWEN" \
    --adapter moe-8c4-parallel --audio-dim 2560 --semantic-codes 1024 --adapter-backend auto \
    --fsdp --balance-scope global \
    --lr 1e-5 --warmup-steps 20 --decay-fraction 0.1 --beta1 0.9 --beta2 0.95 --grad-clip 1.0 \
    --max-steps 20000 --max-batch-tokens 16384 --max-batch-size 64 --grad-accum 1 \
    --aux-lambda 0.01 --bf16 --eval-every 1000 --save-every 1000 \
    --feature-cache "${FEATURES:-data/features}" "$@"
