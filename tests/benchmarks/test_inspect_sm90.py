"""Every kernel compiles for Hopper (sm_90) with Triton's bundled ptxas, without a GPU: wgmma in
the 16-bit GEMMs, 128-bit cp.async when the widths allow it, no register spills, and (read from
the pipelined IR) >= 3 stages in flight and no synchronous wgmma wait in every 16-bit aligned GEMM
main loop, weight gradients included. This is the CPU-side guard for GPU code the interpreter
cannot check (compile errors, spills, fallbacks, unpipelined loops). Other architectures: an
RTX 30's (and A100's) compile uses tensor cores (HMMA) in a 3-stage pipeline, a B200's tcgen05
likewise, a T4's cannot (Triton's FMA dot below sm_80)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_kernels.gemm_config import PERSISTENT_SHARED_BYTES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args",
    [
        # 16-bit, widths multiples of 16 (the Hopper fast path): every GEMM, the weight gradients
        # included, also keeps >= 3 stages in flight and never waits on its own wgmma.
        ["--check-pipeline"],  # paper shape, bf16: the 128-row tile configs
        ["--check-pipeline", "--tokens", "512", "--dtype", "float16"],  # few rows per expert: 64-row tiles
        ["--check-pipeline", "--experts", "128", "--top-k", "8", "--tokens", "4096"],
        ["--experts", "3", "--top-k", "1", "--d", "100", "--f", "72", "--tokens", "129"],  # unaligned: scalar loads
    ],
    ids=["paper-bf16", "small-fp16", "e128", "odd-dims"],  # fp32: below, with the persistent schedule
)
def test_kernels_compile_for_sm90_without_spills(args):
    _inspect(args, "tiles")


@pytest.mark.parametrize("args", [["--check-pipeline"], ["--dtype", "float32"]], ids=["paper-bf16", "fp32"])
def test_persistent_gemms_compile_with_tma(args):
    """MOE_ADAPTER_GEMM=persistent: the four row GEMMs on the persistent kernel read their weights
    (and sorted-order rows) through TMA, keep >= 3 stages in flight without spills; fp32 stays on
    the tile kernel (2 stages: mma, not wgmma), so its case here is also the tile schedule's fp32
    compile (the two reports were identical, 2026-12-03), run once rather than twice."""
    out = _inspect(args, "persistent")
    rows = [line.split() for line in out.splitlines() if line.startswith("_persistent_mm_kernel")]
    if "float32" in args:
        assert not rows
    else:
        assert len(rows) == 4 and all(int(r[9]) > 0 for r in rows), out  # the tma column
        # gemm_config.runs_persistent admits a GPU by this bound on the shared memory per block
        assert max(int(r[3]) for r in rows) <= PERSISTENT_SHARED_BYTES, out  # the smem column


SMALL = ["--tokens", "512", "--d", "256", "--f", "128", "--dtype", "float16"]  # compiles in ~20 s


@pytest.mark.parametrize(
    "arch,mma,smem_kb", [(86, "HMMA", 99), (100, "UTCHMMA", 227), (75, "FMA", None)], ids=["sm86", "sm100", "sm75"]
)
def test_tensor_cores_by_architecture(arch, mma, smem_kb):
    """An RTX 30 part (sm_86; an A100's sm_80 compiles to the same tiles): every GEMM on mma.sync
    (HMMA), 3 stages in flight, no spills, within the 99 KB of shared memory a block may take there.
    A B200 (sm_100): tcgen05 (UTCHMMA), 3 stages, no wait on the MMA just issued. A T4 (sm_75):
    Triton compiles tl.dot to FFMA, no tensor-core instruction at all (triton-lang/triton#5066),
    which is why backend="auto" runs the torch reference below sm_80; should a Triton release bring
    Turing's mma back, this fails and that rule (platform.TRITON_MMA_CAPABILITY) wants revisiting."""
    pipeline = ["--check-pipeline"] if smem_kb else []
    proc = _run(["--check", *pipeline, "--arch", str(arch), *SMALL], "tiles")
    assert proc.returncode == (0 if smem_kb else 1), proc.stdout[-4000:] + proc.stderr[-4000:]
    gemms = [line.split() for line in proc.stdout.splitlines() if line.startswith(("_grouped_mm_kernel", "_wgrad"))]
    assert len(gemms) == 6 and all(r[5].endswith(mma) for r in gemms), proc.stdout  # the mma column
    if smem_kb:
        assert max(int(r[3]) for r in gemms) <= smem_kb * 1024, proc.stdout  # the part's per-block limit
    else:
        assert proc.stdout.count("no tensor cores on sm_75") == 6 and "runs the torch reference" in proc.stdout


def test_the_pipeline_check_refuses_an_architecture_without_tensor_cores():
    proc = _run(["--check-pipeline", "--arch", "75"], "tiles")  # FMA loops: no MMA pipeline to read
    assert proc.returncode == 2 and "got --arch 75" in proc.stderr


def _inspect(args: list[str], schedule: str) -> str:
    proc = _run(["--check", *args], schedule)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "_wgrad_kernel" in proc.stdout and "_router_bwd_kernel" in proc.stdout
    return proc.stdout


def _run(args: list[str], schedule: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "MOE_ADAPTER_GEMM": schedule}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.inspect_sm90", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


ASYNC_LOOP = """
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable>
    %b = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared1, #smem, mutable>
    %r:4 = scf.for %k = %c0 to %n step %c64 iter_args(%acc = %cst) -> (tensor<128x128xf32, #mma>) : i32 {
      %t = ttg.async_wait %x, %y {num = 2 : i32}
      %d = ttng.warp_group_dot %a1, %b1, %acc {isAsync = true} : !ttg.memdesc<128x64xbf16> -> tensor<128x128xf32, #mma>
      %w:3 = ttng.warp_group_dot_wait %d, %a1, %b1 {pendings = 1 : i32} : tensor<128x128xf32, #mma>
      scf.yield %w#0 : tensor<128x128xf32, #mma>
    }
    %e = ttg.async_wait {num = 0 : i32}
"""


TCGEN05_LOOP = """
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared1, #smem, mutable>
    %b = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared1, #smem, mutable>
    %r:4 = scf.for %k = %c0 to %n step %c64 iter_args(%a_prev = %a0, %b_prev = %b0) -> (i32) : i32 {
      %t = ttg.async_wait %x, %y {num = 2 : i32}
      ttng.tc_gen5_mma %a_cur, %b_cur, %acc, %true, %true, %bar[%true] {is_async} : !ttg.memdesc<128x64xbf16>
      ttng.wait_barrier %bar, %ph deps %a_prev, %b_prev : !ttg.memdesc<1xi64, #shared, #smem, mutable>
      scf.yield %a_cur, %b_cur : i32
    }
"""


def test_pipeline_reader_on_hand_written_ir():
    """Three buffers and a wait that leaves two copy groups outstanding: 3 stages, asynchronous.
    A wait for every copy in the loop leaves one stage in flight; pendings = 0 waits on the wgmma."""
    from benchmarks.sm90_ir import blocks_per_sm, pipeline

    assert pipeline(ASYNC_LOOP) == {"stages": 3, "mma_sync_wait": False, "tma": 0}
    sync = ASYNC_LOOP.replace("{num = 2 : i32}", "{num = 0 : i32}").replace("pendings = 1", "pendings = 0")
    assert pipeline(sync) == {"stages": 1, "mma_sync_wait": True, "tma": 0}
    assert pipeline("tt.func @k() {\n  tt.return\n}") == {"stages": 0, "mma_sync_wait": False, "tma": 0}
    # A persistent kernel's flattened tile loop: TMA copies on barriers (no cp.async wait: the
    # buffers' depth is the stages in flight) and a full wgmma wait only in the epilogue branch.
    barrier_wait = ASYNC_LOOP.replace("%t = ttg.async_wait %x, %y {num = 2 : i32}", "ttng.wait_barrier %bar, %ph")
    persistent = barrier_wait.replace(
        "      scf.yield %w#0",
        "      ttng.async_tma_copy_global_to_local %desc[%i, %k] %a2, %bar, %true\n"
        "      scf.if %last {\n"
        "        %z:3 = ttng.warp_group_dot_wait %w#0 {pendings = 0 : i32}\n"
        "      }\n"
        "      scf.yield %w#0",
    )
    assert pipeline(persistent) == {"stages": 3, "mma_sync_wait": False, "tma": 1}
    # sm_100 (tcgen05): the loop waits on a barrier for the MMA whose buffers (`deps`) it reads
    # next; waiting on the MMA it has just issued (its own buffers) serializes the loop.
    assert pipeline(TCGEN05_LOOP) == {"stages": 3, "mma_sync_wait": False, "tma": 0}
    own = TCGEN05_LOOP.replace("deps %a_prev, %b_prev", "deps %a_cur, %b_cur")
    assert pipeline(own) == {"stages": 3, "mma_sync_wait": True, "tma": 0}
    # 128 registers x 256 threads = 32K of the SM's 64K; 98 KB + 1 KB reserved twice fits 228 KB.
    assert blocks_per_sm(128, 8, 98304) == 2 and blocks_per_sm(142, 8, 98304) == 1
    assert blocks_per_sm(32, 4, 0) == 16  # threads bound: 2048 / 128
    # Other parts' limits: 48 KB blocks fit 2 on an sm_86 SM (100 KB) against 4 on Hopper's 228 KB;
    # sm_75 holds 1024 threads; a part the table lacks gets no number rather than Hopper's.
    assert blocks_per_sm(32, 8, 48 * 1024, 86) == 2 and blocks_per_sm(32, 8, 48 * 1024, 90) == 4
    assert blocks_per_sm(32, 8, 0, 75) == 4 and blocks_per_sm(32, 8, 0, 100) is None
