"""The "auto" backend's choice on CUDA: time each candidate implementation once per (GPU, dtype,
shape class), keep the fastest in this process and in a small JSON file (AUTO_CACHE_ENV, default
~/.cache/moe_adapter/backend_choice.json), and report what ran.

Candidates (`auto_candidates`): "triton:<schedule>" for every Triton GEMM schedule that runs
different kernels there (gemm_config.distinct_schedules), "grouped_mm" where torch._grouped_mm
runs, and "torch" (the reference's cuBLAS calls), so auto never runs a fused path slower than the
reference. AUTO_PIN_ENV pins the choice. backend.py decides when auto times at all.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from moe_kernels.gemm_config import distinct_schedules
from moe_kernels.grouped_mm_experts import grouped_mm_unavailable
from moe_kernels.platform import AUTO_PIN_ENV

AUTO_CACHE_ENV = "MOE_ADAPTER_BACKEND_CACHE"  # path of the JSON file that remembers auto's choices
AUTO_REPEATS = 5  # timed calls per candidate (after one warm-up); the median decides
log = logging.getLogger("moe_kernels")


def shape_class(args: tuple) -> str:
    """The key auto's choice is remembered under: GPU, dtype, E, K, D, F, N, grad or not, and T
    rounded up to a power of two (tile configs change with rows per expert, not with every T)."""
    z_TD, _, w1_EDF, w2_EFD, top_k = args[:5]
    T, D = z_TD.shape
    E, _, F = w1_EDF.shape
    dev = z_TD.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in args[:4])
    t_class = 1 << max(0, int(T - 1).bit_length())
    dtype = str(z_TD.dtype).removeprefix("torch.")
    return f"{gpu}|{dtype}|E{E}K{top_k}|D{D}F{F}N{w2_EFD.shape[2]}|T<={t_class}|{'fwd+bwd' if grad else 'fwd'}"


def _cache_path() -> Path:
    return Path(os.environ.get(AUTO_CACHE_ENV) or Path.home() / ".cache" / "moe_adapter" / "backend_choice.json")


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or unreadable: time again (and rewrite it)
    return data if isinstance(data, dict) else {}


@functools.cache
def _choices_this_process() -> dict:
    return {}


@functools.cache
def _last_choice() -> list:
    return [None]  # [(shape class, candidate)] of the latest choose_auto call


def last_auto_choice() -> tuple[str, str] | None:
    """(shape class, candidate) that the latest "auto" call ran, pinned, remembered or timed:
    what a benchmark row of backend="auto" reports."""
    return _last_choice()[0]


def choose_auto(key: str, candidates: dict[str, Callable[[], float]]) -> str:
    """The candidate with the lowest time for `key`: pinned by AUTO_PIN_ENV, else remembered (this
    process, then the cache file), else each timed once (`candidates[name]()` returns seconds) and
    the choice written to the cache file (atomically) and logged. A candidate that raises is out."""
    choice = _remembered_choice(key, candidates) or _timed_choice(key, candidates)
    _last_choice()[0] = (key, choice)
    return choice


def _remembered_choice(key: str, candidates: dict) -> str | None:
    """The pinned candidate, or the one this process or the cache file chose for `key` among the
    same candidates (a file written before a new candidate existed, say a new GEMM schedule after
    an upgrade, is timed again)."""
    pin = os.environ.get(AUTO_PIN_ENV)
    if pin:
        if pin not in candidates:
            raise ValueError(f"{AUTO_PIN_ENV}={pin!r}: choose one of {sorted(candidates)} for {key}")
        return pin
    memo = _choices_this_process()
    if key in memo:
        return memo[key]
    cached = _read_cache(_cache_path()).get(key)
    if isinstance(cached, dict) and cached.get("candidates") == sorted(candidates):
        memo[key] = cached["choice"]
        return memo[key]
    return None


def _timed_choice(key: str, candidates: dict[str, Callable[[], float]]) -> str:
    """Time each candidate once; remember the fastest in this process and the cache file."""
    seconds = {}
    for name, timed in candidates.items():
        try:
            seconds[name] = float(timed())
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is simply not chosen
            log.warning("moe_kernels auto backend: %s failed for %s (%s)", name, key, exc)
    if not seconds:
        raise RuntimeError(f"auto backend: no candidate ran for {key}")
    choice = min(seconds, key=seconds.get)
    _choices_this_process()[key] = choice
    path = _cache_path()
    data = _read_cache(path)
    data[key] = {"choice": choice, "seconds": seconds, "candidates": sorted(candidates)}
    # Unique to the call, not the pid alone: ranks on nodes that share a home directory can have the
    # same pid, and one's rename would move the file the other is still writing.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only or full disk: the old file stands, no partial one is left
        tmp.unlink(missing_ok=True)
        log.warning("moe_kernels auto backend: cannot write %s (%s); the choice holds for this process", path, exc)
    times = ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in sorted(seconds.items()))
    log.info("moe_kernels auto backend for %s: %s (%s)", key, choice, times)
    return choice


def cuda_seconds(fn, args: tuple) -> float:
    """Median seconds of fn on fresh leaves of args (forward, and backward when grads are needed)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in args[:4]]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)

    def step():
        out = fn(*leaves, *args[4:])
        if grad:
            (out.h_TD.float().sum() + out.aux_loss.float()).backward()

    step()
    times = []
    for _ in range(AUTO_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def auto_candidates(args: tuple) -> list[str]:
    """What "auto" times for a call with inputs `args` (z, router, w1, w2, ...): "triton:<name>"
    for each gemm_config.distinct_schedules (tiles+split first), "grouped_mm" where it runs, and
    "torch" (the reference: a cuBLAS GEMM pair per expert), timed like the others so that auto
    never runs a fused path slower than it, on any GPU and shape.
    Schedules that would run the same kernels (persistent GEMMs in fp32 or where they do not run; the
    weight-gradient split without a backward) are left out rather than timed twice."""
    z_TD = args[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in args[:4])
    names = [f"triton:{s.name}" for s in distinct_schedules(z_TD.dtype, z_TD.device, grad)]
    if grouped_mm_unavailable(z_TD.device, z_TD.dtype) is None:
        names.append("grouped_mm")
    return [*names, "torch"]


def auto_choices() -> dict:
    """{shape class: backend} that "auto" chose (or read) in this process: what ran, for reports."""
    return dict(_choices_this_process())
