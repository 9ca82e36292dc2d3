"""Every kernel compiles for Hopper (sm_90) with Triton's bundled ptxas, without a GPU: wgmma in
the 16-bit GEMMs, 128-bit cp.async when the widths allow it, and no register spills. This is the
CPU-side guard for GPU code the interpreter cannot check (compile errors, spills, fallbacks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args",
    [
        [],  # paper shape, bf16: the 128-row tile configs
        ["--tokens", "512", "--dtype", "float16"],  # few rows per expert: the 64-row configs
        ["--dtype", "float32"],
        ["--experts", "128", "--top-k", "8", "--tokens", "4096"],
        ["--experts", "3", "--top-k", "1", "--d", "100", "--f", "72", "--tokens", "129"],  # unaligned
    ],
    ids=["paper-bf16", "small-fp16", "fp32", "e128", "odd-dims"],
)
def test_kernels_compile_for_sm90_without_spills(args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.inspect_sm90", "--check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "_grouped_wgrad_kernel" in proc.stdout and "_router_bwd_kernel" in proc.stdout
