"""Tile configurations and dtype rules shared by the grouped GEMM kernels (grouped_gemm.py: the
row GEMMs; wgrad.py: the weight gradients): one place decides BLOCK sizes, the accumulator dtype,
TF32 and the interpreter's bf16 workaround, so the forward and both backward GEMMs agree; and the
schedules a call can run (Schedule: tile or persistent row GEMMs, split or whole weight
gradients), which backend="auto" times against each other.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton.language as tl

from moe_kernels.platform import interpreter_requested, triton_mma
from moe_kernels.reference import Permutation

# Epilogues of _grouped_mm_kernel.
EPI_SILU = 0  # store SiLU(acc) (times the routing weight if SCALE; and pre = acc) at sorted rows
EPI_SCATTER = 1  # store acc (times the routing weight if SCALE) at the pair's row
EPI_DSILU = 2  # backward through the routing weight and SiLU, plus d(weight) partials


GEMM_SCHEDULES = ("tiles", "persistent")  # the row GEMMs: one program per tile, or per SM
WGRAD_SCHEDULES = ("split", "nosplit")  # the weight gradients: split-K over row chunks, or not
SM90_SMS = 132  # H100 SXM / H200: the SM count assumed when compiling without a GPU (inspect_sm90)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persistent: bool = False  # the row GEMMs run persistent_gemm's kernel (TMA, one program per SM)


class Schedule(NamedTuple):
    """How the Triton expert GEMMs of one forward+backward run: `gemm` for the four row GEMMs
    ("tiles": grouped_gemm's kernel; "persistent": persistent_gemm's, where TMA exists) and
    `wgrad` for dW1/dW2 ("split": wgrad.py's split-K chunks; "nosplit": one chunk per expert).
    Both give the same math; which is faster depends on the GPU and the shapes, so backend="auto"
    times them (backend.py) and the forward keeps its schedule for its own backward."""

    gemm: str = "tiles"
    wgrad: str = "split"

    @property
    def name(self) -> str:
        return f"{self.gemm}+{self.wgrad}"

    @classmethod
    def parse(cls, name: str) -> Schedule:
        """The schedule a `name` says ("persistent+nosplit"), or ValueError naming the choices."""
        gemm, _, wgrad = name.partition("+")
        if gemm not in GEMM_SCHEDULES or wgrad not in WGRAD_SCHEDULES:
            names = [cls(g, w).name for g in GEMM_SCHEDULES for w in WGRAD_SCHEDULES]
            raise ValueError(f"schedule must be one of {names}, got {name!r}")
        return cls(gemm, wgrad)


BUILTIN_SCHEDULE = Schedule()  # tiles+split: what runs unless the environment or auto says otherwise


def default_schedule() -> Schedule:
    """What backend="triton" runs: MOE_ADAPTER_GEMM ("tiles", the default, or "persistent") and
    MOE_ADAPTER_WGRAD ("split", the default, or "nosplit"), read at each call. The defaults stay
    until the GPU suite has timed every schedule (benchmarks/gpu_suite.sh); backend="auto" times
    them on the user's own GPU instead."""
    # An empty value (`MOE_ADAPTER_GEMM= cmd`, a shell's way to unset) is the default, as unset.
    gemm = os.environ.get("MOE_ADAPTER_GEMM") or BUILTIN_SCHEDULE.gemm
    wgrad = os.environ.get("MOE_ADAPTER_WGRAD") or BUILTIN_SCHEDULE.wgrad
    if gemm not in GEMM_SCHEDULES:
        raise ValueError(f"MOE_ADAPTER_GEMM must be one of {GEMM_SCHEDULES}, got {gemm!r}")
    if wgrad not in WGRAD_SCHEDULES:
        raise ValueError(f"MOE_ADAPTER_WGRAD must be one of {WGRAD_SCHEDULES}, got {wgrad!r}")
    return Schedule(gemm, wgrad)


def distinct_schedules(dtype: torch.dtype, device: torch.device, grad: bool) -> list[Schedule]:
    """The schedules that run different kernels for `dtype` on `device`: persistent row GEMMs only
    for 16-bit dtypes where they run (runs_persistent; elsewhere gemm_config and grouped_mm fall
    back to the tiles), and the weight-gradient choice only when a backward runs (`grad`)."""
    gemms = ["tiles"]
    if dtype in (torch.float16, torch.bfloat16) and runs_persistent(device):
        gemms.append("persistent")
    wgrads = WGRAD_SCHEDULES if grad else WGRAD_SCHEDULES[:1]
    return [Schedule(g, w) for g in gemms for w in wgrads]


# The most shared memory one block of a persistent row GEMM takes: 163,872 B, the 4-stage
# 128x128x64 16-bit tiles on sm_90 (139,312 B on sm_100; inspect_sm90, Triton 3.9, 2026-12-03).
# GPUs with TMA but less per block, the RTX 50 series and other sm_120 parts (99 KB; those tiles
# took 106,520 B there), would fail that launch: the tile kernel serves them.
PERSISTENT_SHARED_BYTES = 163_872


@functools.cache
def runs_persistent(device: torch.device) -> bool:
    """The persistent row GEMMs run on `device`: TMA copies (sm_90 on) and PERSISTENT_SHARED_BYTES
    of shared memory per block (the CUDA opt-in limit: 227 KB on H100/H200 and B200). Off a GPU
    (the interpreter, compile-only inspection) True; a GPU that does not report the limit, False."""
    if device.type != "cuda":
        return True
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    return props.major >= 9 and shared >= PERSISTENT_SHARED_BYTES


@functools.cache
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; SM90_SMS elsewhere (compile-only inspection, the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM90_SMS


def gemm_config(
    dtype: torch.dtype,
    rows: int,
    num_experts: int,
    *,
    aligned: bool,
    epilogue: int = EPI_SCATTER,
    persistent: bool = False,
) -> GemmConfig:
    """Tile shapes, fixed per dtype and shape class rather than autotuned: autotuning would let two
    processes pick different BLOCK_K, and so different summation orders, breaking bit-identical
    results across runs. Every config here was compiled for sm_90 with Triton 3.9's ptxas
    (benchmarks/inspect_sm90.py): no register spills; 16-bit GEMMs use wgmma and, when `aligned`
    (both GEMM widths multiples of 16, so loads vectorize), 128-bit cp.async with 3 stages in
    flight; on sm_80-89 and sm_120 (mma.sync) one more buffer keeps 3 there too (mma_sync_target).
    Not yet timed on a GPU (none lent so far). `persistent`: a row GEMM of the persistent
    schedule (Schedule.gemm), where its kernel serves the dtype."""
    cfg = _tiles(dtype, rows, num_experts, aligned=aligned, epilogue=epilogue)
    if not persistent:
        return cfg
    if interpreter_requested():
        return cfg._replace(persistent=True)
    if dtype not in (torch.float16, torch.bfloat16):
        # fp32/fp64 multiply on mma.sync, not wgmma: the persistent kernel at fp32's 128x64x32
        # spilled 336-560 B per thread on sm_90 (Triton 3.9, 2026-12-02), so they keep the tiles.
        return cfg
    # One more buffer than the tile kernels: where A rows are gathered (cp.async) beside TMA weight
    # boxes, 3 buffers kept 2 copy stages in flight (the next buffer is still read by the pending
    # wgmma); 4 keep 3, in 164 KB of shared memory at 128x128x64 (sm_90, Triton 3.9, 2026-12-02).
    return cfg._replace(persistent=True, num_stages=4)


def _tiles(dtype: torch.dtype, rows: int, num_experts: int, *, aligned: bool, epilogue: int) -> GemmConfig:
    if interpreter_requested():
        # 32x64x64: test shapes (D=100, F=72, ~90 rows per expert) still cross every tile, expert
        # and K-loop boundary, at a third of the interpreter time of 16x32x32 (measured on CPU).
        return GemmConfig(32, 64, 64, 4, 1)
    if dtype == torch.float64:
        return GemmConfig(32, 32, 16, 4, 2)
    if dtype == torch.float32:  # 64x64x32 at 4 warps spilled 376 B on sm_90; 8 warps do not
        return GemmConfig(128, 64, 32, 8, 3) if aligned else GemmConfig(64, 64, 32, 8, 3)
    if not aligned:  # scalar loads pipeline through registers: 64x128x64 spilled 1080 B
        return GemmConfig(64, 64, 32, 8, 3)
    # The dSiLU epilogue holds acc and pre tiles at once (act is recomputed from pre): at 128x128 it
    # still spills 40 B/thread (192 B when it also loaded act), at 128x64 it fits in 145 registers
    # (sm_90, Triton 3.9, 2026-12-02).
    block_n = 64 if epilogue == EPI_DSILU else 128
    # On mma.sync GPUs Triton buffers num_stages - 1 copies, where Hopper's wgmma loop buffers
    # num_stages (sm_80 compile, Triton 3.9, 2026-12-03: 2 buffers, 64 KB and 2 stages in flight at
    # num_stages 3; 3 buffers, 96 KB, 3 in flight at 4, no spills): one more keeps sm_90's 3 in
    # flight, in shared memory that fits the 99 KB per block of sm_86/89/120 parts.
    stages = 4 if mma_sync_target() else 3
    if rows < 256 * num_experts:  # few rows per expert: halve M so fewer rows are padding
        return GemmConfig(64, block_n, 64, 4, stages)
    return GemmConfig(128, block_n, 64, 8, stages)


def mma_sync_target() -> bool:
    """Triton compiles for a GPU whose tensor cores it drives with mma.sync (HMMA): sm_80-89 and
    sm_120 (RTX 50), not sm_90 (wgmma) or sm_100 (tcgen05). Read from Triton's active target, the
    GPU the JIT compiles for (the stub of benchmarks/inspect_sm90 when compiling without one)."""
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return target.backend == "cuda" and triton_mma(target.arch) == "mma.sync"


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast(dtype: torch.dtype) -> bool:
    """Dot bf16 tiles as fp32 in the interpreter only: its bf16 tl.dot multiplies raw bit patterns
    (Triton issue 11584; a bare bf16 kernel was off by ~1e10 here, the converted fp32 tiles exact).
    bf16 products are exact in fp32, so this equals the GPU's bf16 MMA with fp32 accumulation up
    to summation order. Compiled kernels never upcast."""
    return dtype == torch.bfloat16 and interpreter_requested()


def row_major(perm: Permutation) -> Permutation:
    """The permutation with every tensor contiguous: the kernels index them row-major. A no-op
    (no copy) for permute()'s own outputs; a strided view a user passes is copied once."""
    return Permutation(*(t.contiguous() for t in perm))
