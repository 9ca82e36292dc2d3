"""Timers: events via triton.testing.do_bench on GPU, an interleaved repeated
timer on CPU, peak memory, measured matmul and copy ceilings (device facts: adapter/environment.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Datasheet dense peaks (TFLOP/s) and HBM bandwidth (GB/s), SXM parts. Used only to express a
# measured rate as a percentage; the run also measures what cuBLAS and a copy achieve.
DATASHEET = {
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9, "hbm_gbs": 3350.0},
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9, "hbm_gbs": 4800.0},
}

CEILING_CPU_BUDGET_S = 3.0  # seconds of timer rounds per ceiling on a CPU (a plan may ask for fewer)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_gpu(fn: Callable[[], None], grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """CUDA-event timing with the L2 cache flushed before every rep (triton.testing.do_bench)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return Timing(med, p20, p80, reps=max(1, round(rep_ms / max(med, 1e-3))))


def time_cpu_interleaved(
    fns: dict[str, Callable[[], None]],
    *,
    warmup: int = 1,
    min_reps: int = 5,
    budget_s: float = 3.0,
    reset: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Round-robin timer: every round runs each provider once, in an order rotated per round, so
    slow drifts of the machine (frequency, other load) spread over all providers alike."""
    names = list(fns)
    if not names:  # every provider of a case failed or is unavailable: nothing to time
        return {}
    for _ in range(warmup):
        for n in names:
            fns[n]()
            if reset:
                reset()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < min_reps or (time.perf_counter() - start < budget_s and r < 200):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
            if reset:
                reset()
        r += 1
    return {n: Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s)) for n, s in samples.items()}


def peak_memory_gpu(fn: Callable[[], None]) -> int:
    """Bytes allocated at the peak of one call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measured_matmul_tflops(
    device: torch.device, dtype: torch.dtype, cpu_budget_s: float = CEILING_CPU_BUDGET_S
) -> float:
    """The achievable dense GEMM rate: one large square matmul through torch (cuBLAS / CPU BLAS)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _ceiling_ms(lambda: torch.matmul(a, b), device, cpu_budget_s)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measured_copy_gbs(device: torch.device, cpu_budget_s: float = CEILING_CPU_BUDGET_S) -> float:
    """Device-memory bandwidth from a large copy, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _ceiling_ms(lambda: dst.copy_(src), device, cpu_budget_s)
    return 2 * n / (ms * 1e-3) / 1e9


def _ceiling_ms(fn: Callable[[], object], device: torch.device, cpu_budget_s: float) -> float:
    """Median ms of one ceiling probe: CUDA events on a GPU, interleaved timer rounds on a CPU."""
    if device.type == "cuda":
        return time_gpu(fn).median_ms
    return time_cpu_interleaved({"probe": fn}, budget_s=cpu_budget_s)["probe"].median_ms


def datasheet_for(device_name: str) -> dict[str, float] | None:
    for key, value in DATASHEET.items():
        if key in device_name:
            return value
    return None
