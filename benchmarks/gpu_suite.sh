#!/usr/bin/env bash
# One call on a lent GPU (device tool: `bash benchmarks/gpu_suite.sh`): the GPU tests (bf16
# included) and the full benchmark suite, results written under $OUT (the device tool's folder)
# or benchmarks/results. Uses the machine's own python3, torch and triton: it installs nothing,
# since the lent machines reach no package registry.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    git rev-parse --short HEAD 2>/dev/null || echo "git: unknown"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$RES/environment.txt" 2>&1
cat "$RES/environment.txt"

# 1. GPU tests: bf16 against float64 and torch's own bf16, determinism, CUDA-graph capture.
$PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$RES/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. Benchmarks: adapter providers (paper shapes, T 1k..64k, three routings) and kernel-level.
$PY -m benchmarks --plan gpu --out "$RES" --quiet "$@" 2>&1 | tee "$RES/benchmarks.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc; results in $RES"
exit $(( tests_rc != 0 || bench_rc != 0 ))
