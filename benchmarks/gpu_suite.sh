#!/usr/bin/env bash
# One call on a lent GPU (device tool: `bash benchmarks/gpu_suite.sh`): the GPU tests (bf16
# included) and the full benchmark suite, results written under benchmarks/results, or, where $OUT
# is set (the device tool's folder), packed into $OUT/gpu-suite.tar.gz. Extra arguments go to
# `python -m benchmarks`. The device tool copies the working tree without .git: name the commit,
# `MOE_ADAPTER_GIT_SHA=<sha> bash benchmarks/gpu_suite.sh`. Uses the machine's own python3, torch
# and triton: it installs nothing, since the lent machines reach no package registry.
set -uo pipefail
cd "$(dirname "$0")/.."

# The GPU tests run from the files that mark some: the lent machines lack the LALM's packages
# (openai-whisper, soundfile), and one test module failing to import stops all of pytest's
# collection. `--list-gpu-test-files` prints them and exits (tests/benchmarks checks the list).
mapfile -t gpu_files < <(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu' tests | sort)
if [ "${1:-}" = "--list-gpu-test-files" ]; then
    printf '%s\n' "${gpu_files[@]}"
    exit 0
fi
# The device tool returns at most 8 files from $OUT (16 MiB each, two folders deep: its README,
# read 2026-12-03), and a run writes about 18 (logs, and CSV/JSON/markdown/PNG per stage). So with
# $OUT set the results are written to a staging folder and packed into one archive after every
# stage; only the archive, environment.txt and summary.txt are written to $OUT itself.
if [ -n "${OUT:-}" ]; then
    RES=$(mktemp -d "${TMPDIR:-/tmp}/moe-adapter-gpu-suite.XXXXXX") || { echo "gpu_suite: no staging folder"; exit 2; }
    mkdir -p "$OUT"
else
    RES=benchmarks/results
fi
mkdir -p "$RES"
pack() {  # atomic: a run stopped mid-pack leaves the previous archive whole
    [ -n "${OUT:-}" ] || return 0
    local part="$OUT/gpu-suite.tar.gz.part$BASHPID"  # the background packer below has its own
    if command -v tar >/dev/null; then
        tar -czf "$part" -C "$RES" .
    else  # a bare image: Python's tarfile writes the same archive
        $PY -c "import sys, tarfile; t = tarfile.open(sys.argv[1], 'w:gz'); t.add(sys.argv[2], '.'); t.close()" "$part" "$RES"
    fi && mv -f "$part" "$OUT/gpu-suite.tar.gz"
    cp -f "$RES/environment.txt" "$OUT/environment.txt" 2>/dev/null
    return 0
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# backend="auto" (the moe-auto rows, the auto gpu test) writes what it timed per candidate here:
# the four Triton GEMM schedules and grouped_mm per shape class, returned with the results.
export MOE_ADAPTER_BACKEND_CACHE="$RES/backend_choice.json"
PY=${PYTHON:-python3}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    echo "git ${MOE_ADAPTER_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$RES/environment.txt" 2>&1
cat "$RES/environment.txt"

# Without a GPU every test here would be skipped and the plan would time the CPU: refuse, unless
# this is a dry run of the script itself (GPU_SUITE_DRY_RUN=1, e.g. with `--plan smoke`).
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    && [ "${GPU_SUITE_DRY_RUN:-0}" != 1 ]; then
    echo "gpu_suite: no CUDA GPU visible to $PY; nothing run (GPU_SUITE_DRY_RUN=1 runs it anyway)" | tee "$RES/no-gpu.txt"
    pack
    [ -n "${OUT:-}" ] && cp -f "$RES/no-gpu.txt" "$OUT/summary.txt"
    exit 3
fi

# A session has 15 minutes of device time, the machine's start (a minute or more) included, and
# should keep room for a second, shorter call (device README, 2026-12-03): the whole script ends
# within SUITE_S (8 minutes; call it with timeout_s >= 540). Every stage runs under a time limit,
# the benchmarks stop starting new cases at their budget (keeping 60 s for the last case, the plot
# and the report) and rewrite their results after every case.
SUITE_S=${SUITE_S:-480}
TESTS_S=${TESTS_S:-180}

# 1. GPU tests: bf16 against float64 and torch's own bf16, determinism, CUDA-graph capture.
#    A box without pytest still gets its numbers: the stage is skipped, saying so.
#    -v names each test as it ends (a stage stopped at its limit shows how far it got), and
#    --durations the slowest: the first GPU run says whether TESTS_S fits the kernels' compiles.
tests_state=ran
if ! $PY -c "import pytest" >/dev/null 2>&1; then
    tests_state="SKIPPED (pytest is not installed for $PY)"
    echo "gpu tests $tests_state; the benchmarks still run" | tee "$RES/gpu-tests.log"
    tests_rc=4
else
    echo "gpu test files: ${gpu_files[*]}"
    timeout --kill-after=10 "$TESTS_S" $PY -m pytest -v --durations=15 -m gpu "${gpu_files[@]}" -p no:cacheprovider 2>&1 \
        | tee "$RES/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
    [ "$tests_rc" -ge 124 ] && echo "gpu tests stopped at their ${TESTS_S}s limit (rc=$tests_rc)" | tee -a "$RES/gpu-tests.log"
fi
pack
# The benchmarks rewrite their results after every case; a packer beside them keeps the archive
# at most 20 s behind, should the call be stopped before the stages' own limits end it.
# It stops at a flag file rather than a signal, so no half-written archive is left behind.
if [ -n "${OUT:-}" ]; then
    (n=0; while [ ! -e "$RES.stop" ]; do sleep 1; n=$((n + 1)); [ $((n % 20)) -eq 0 ] && pack; done) &
    packer=$!
    trap 'touch "$RES.stop"' EXIT
fi

# 2a. The routed-expert block alone (issue 16's kernel targets: >= 3x the eager loop, faster than
#     torch._grouped_mm), under its own small budget. A dry run skips it unless BLOCK_PLAN is set.
BLOCK_S=${BLOCK_S:-90}
block_rc=0
if [ "${GPU_SUITE_DRY_RUN:-0}" != 1 ] || [ -n "${BLOCK_PLAN:-}" ]; then
    timeout --kill-after=10 "$BLOCK_S" $PY -m benchmarks --plan "${BLOCK_PLAN:-gpu-block}" --level block --out "$RES" \
        --quiet --no-kernels --budget-s "$(( BLOCK_S > 40 ? BLOCK_S - 30 : 10 ))" 2>&1 | tee "$RES/benchmarks-block.log"
    block_rc=${PIPESTATUS[0]}
fi

# 2c. The same block plan with the persistent TMA row GEMMs (MOE_ADAPTER_GEMM=persistent,
#     moe_kernels/persistent_gemm.py), into $RES/persistent: which schedule becomes the default is
#     decided from these two tables.
PERSISTENT_S=${PERSISTENT_S:-70}
persistent_rc=0
if [ "${GPU_SUITE_DRY_RUN:-0}" != 1 ] || [ -n "${BLOCK_PLAN:-}" ]; then
    mkdir -p "$RES/persistent"
    MOE_ADAPTER_GEMM=persistent timeout --kill-after=10 "$PERSISTENT_S" $PY -m benchmarks --plan "${BLOCK_PLAN:-gpu-block}" \
        --level block --out "$RES/persistent" --quiet --no-kernels \
        --budget-s "$(( PERSISTENT_S > 40 ? PERSISTENT_S - 30 : 10 ))" 2>&1 | tee "$RES/persistent/benchmarks-block.log"
    persistent_rc=${PIPESTATUS[0]}
fi

# 2b. Benchmarks: kernel-level, then adapter providers (paper shapes, T 1k..64k, three routings).
left=$(( SUITE_S - SECONDS ))
budget=$(( left > 60 ? left - 60 : 0 ))  # never negative: with no time left every case is reported as not run
timeout --kill-after=10 "$(( left > 10 ? left : 10 ))" $PY -m benchmarks --plan gpu --out "$RES" --quiet --budget-s "$budget" "$@" \
    2>&1 | tee "$RES/benchmarks.log"
bench_rc=${PIPESTATUS[0]}

[ -n "${packer:-}" ] && touch "$RES.stop" && wait "$packer"
{
    echo "gpu tests rc=$tests_rc ($tests_state), block benchmarks rc=$block_rc (persistent GEMMs rc=$persistent_rc)," \
        "benchmarks rc=$bench_rc; results in ${OUT:+$OUT/gpu-suite.tar.gz, from }$RES"
    for log in "$RES/benchmarks-block.log" "$RES/persistent/benchmarks-block.log" "$RES/benchmarks.log"; do
        [ -f "$log" ] && { echo "== ${log#"$RES"/}"; sed -n '/^targets/,$p' "$log" | grep -v '^wrote '; }
    done
} > "$RES/summary.txt"
pack
[ -n "${OUT:-}" ] && cp -f "$RES/summary.txt" "$OUT/summary.txt"
cat "$RES/summary.txt"
exit $(( tests_rc != 0 || bench_rc != 0 || block_rc != 0 || persistent_rc != 0 ))
