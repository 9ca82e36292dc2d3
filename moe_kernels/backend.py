"""The one place that decides which implementation runs an op.

- "triton": the fused Triton kernels. On CUDA tensors they compile for the GPU; on CPU tensors they
  run in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment *before* triton
  is imported (that is how CI tests the real kernels without a GPU).
- "torch": the pure-PyTorch reference (`reference.py`), on any device.
- "grouped_mm": the Triton router and permutation with the expert GEMMs through torch._grouped_mm
  (`grouped_mm_experts.py`); on CUDA bfloat16 on sm_90+, on CPU (interpreted router) fp32/16-bit.
- "auto": on CUDA, the fastest of the candidates (`auto_candidates`: "grouped_mm" where it runs,
  and "triton:<schedule>" for every Triton GEMM schedule that runs different kernels there, e.g.
  "triton:persistent+split", see gemm_config.Schedule) for the call's (GPU, dtype, shape class),
  timed once (forward, and backward when gradients are needed) and remembered in a small JSON
  file (AUTO_CACHE_ENV, default ~/.cache/moe_adapter/backend_choice.json); where triton cannot run
  (E > MAX_TRITON_EXPERTS, not installed), "torch"; "torch" is a candidate too, so auto never runs
  a fused path slower than the reference's cuBLAS calls. On GPUs below sm_80 (T4, V100) "auto" is
  "torch" without timing: Triton has no tensor-core dot there (TRITON_MMA_CAPABILITY).
  AUTO_PIN_ENV pins the choice ("triton": the default schedule). On CPU "auto" is always "torch":
  the interpreter is a test vehicle, hundreds of times slower.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import statistics
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

BACKENDS = ("auto", "triton", "torch", "grouped_mm")
AUTO_CACHE_ENV = "MOE_ADAPTER_BACKEND_CACHE"  # path of the JSON file that remembers auto's choices
AUTO_PIN_ENV = "MOE_ADAPTER_AUTO_BACKEND"  # a candidate name, or "triton": auto runs it without timing
AUTO_REPEATS = 5  # timed calls per candidate (after one warm-up); the median decides
log = logging.getLogger("moe_kernels")

# The router kernel holds a (tokens x experts) tile in registers; past 128 experts it spills.
MAX_TRITON_EXPERTS = 128


# Triton lowers tl.dot to fp32 FMA below compute capability 8.0 (triton-lang/triton#5066: MMAv1
# removed, no mma.sync for Volta or Turing). Measured on the sm_75 compile of _grouped_mm_kernel
# (fp16 and bf16, Triton 3.9, benchmarks/inspect_sm90 --arch 75, 2026-12-03): 4096 FFMA and no HMMA
# in its SASS, 2.9-7.5 KB spilled per thread; sm_80's has 64 HMMA. cuBLAS keeps the tensor cores
# (a T4's datasheet peaks: 65 TFLOPS fp16 on them, 8 TFLOPS fp32 FMA), so below this auto runs the reference
# (not timed on such a GPU: none lent).
TRITON_MMA_CAPABILITY = (8, 0)


def triton_mma(arch: int) -> str | None:
    """The tensor-core path Triton compiles tl.dot to on sm_<arch> (capability x10): "wgmma" on
    sm_90, "tcgen05" on sm_100-119, "mma.sync" on sm_80-89 and sm_120 on, None below
    TRITON_MMA_CAPABILITY (fp32 FMA). Read from Triton 3.9's SASS (benchmarks/inspect_sm90 --arch N:
    HGMMA, UTCHMMA, HMMA, FFMA); the one place the kernels, auto and the inspection tool ask."""
    if arch < 10 * TRITON_MMA_CAPABILITY[0] + TRITON_MMA_CAPABILITY[1]:
        return None
    if arch == 90:
        return "wgmma"
    return "tcgen05" if 100 <= arch < 120 else "mma.sync"


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


# What torch.compiler.assume_constant_result(cuda_capability) does (it sets this attribute, torch
# 2.0 to 2.13), without importing torch._dynamo with moe_kernels (2.8 s of a 5.3 s import, -X
# importtime, 2-core Xeon, 2026-12-03): dynamo calls the function while tracing resolve_backend
# (custom_ops.moe_ffn) and keeps the result as a constant, no graph break and no CUDA query traced.
cuda_capability._dynamo_marked_constant = True


def triton_has_tensor_cores(device: torch.device) -> bool:
    """Triton's tl.dot runs on tensor cores on `device` (CUDA sm_80 on); True off CUDA."""
    if device.type != "cuda":
        return True
    major, minor = cuda_capability(device)
    return triton_mma(10 * major + minor) is not None


# Host facts, read once at import, so that under torch.compile the functions below return
# constants: torch 2.11's dynamo refuses to trace importlib.util.find_spec (a graph break, an
# error under fullgraph=True; seen with torch 2.11.0, the lent GPU machines' version, 2026-12-02).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return major, minor


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None.

    Before 3.7 the interpreter reads a runtime loop bound through int() of a one-element array,
    which numpy 2.4 turned from a deprecation into a TypeError (triton-lang/triton#9171, fixed in
    3.7.0). Measured here: triton 3.6.0 (what torch 2.11 pins) with numpy 2.4.6 fails every
    interpreted kernel; with numpy 2.3 all pass.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version} "
            "(triton-lang/triton#9171: loop bounds go through int() of a 1-element array): "
            "install numpy<2.4 or triton>=3.7, or use backend='torch' on CPU"
        )
    return None


def _installed_interpreter_incompatibility() -> str | None:
    import numpy

    return interpreter_incompatibility(importlib.metadata.version("triton"), numpy.__version__)


_INSTALLED_INCOMPATIBILITY = _installed_interpreter_incompatibility() if _TRITON_INSTALLED else None


def installed_interpreter_incompatibility() -> str | None:
    """interpreter_incompatibility() for the installed triton and numpy (read at import)."""
    return _INSTALLED_INCOMPATIBILITY


def resolve_backend(backend: str, device: torch.device, num_experts: int) -> str:
    """Return "triton", "torch" or "grouped_mm" for a request ("auto" on CUDA: "triton", which
    `choose_auto` may trade for "grouped_mm" per call), or raise ValueError saying why it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_triton = device.type == "cuda" and triton_available() and num_experts <= MAX_TRITON_EXPERTS
        return "triton" if use_triton and triton_has_tensor_cores(device) else "torch"
    if not triton_available():
        raise ValueError(f"backend={backend!r} but the triton package is not installed")
    if num_experts > MAX_TRITON_EXPERTS:
        raise ValueError(
            f"backend={backend!r} supports at most {MAX_TRITON_EXPERTS} experts (its router is a Triton kernel), "
            f"got num_experts={num_experts}"
        )
    if device.type == "cuda":
        return backend
    if device.type == "cpu":
        if not interpreter_requested():
            raise ValueError(
                f"backend={backend!r} on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                "in the environment before triton is imported, or use backend='torch'"
            )
        if reason := installed_interpreter_incompatibility():
            raise ValueError(reason)
        return backend
    raise ValueError(f"backend={backend!r} runs on CUDA or (interpreted) CPU tensors, got device {device}")


def _implementation(name: str):
    """The moe_ffn of a backend or auto candidate name ("triton:<schedule>": that GEMM schedule)."""
    if name.startswith("triton:"):
        from moe_kernels import functions
        from moe_kernels.gemm_config import Schedule

        return functools.partial(functions.moe_ffn, schedule=Schedule.parse(name.removeprefix("triton:")))
    if name == "torch":
        from moe_kernels import reference

        return reference.moe_ffn
    if name == "grouped_mm":
        from moe_kernels import grouped_mm_experts

        return grouped_mm_experts.moe_ffn
    from moe_kernels import functions

    return functions.moe_ffn


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


def _cuda_seconds(fn, args: tuple) -> float:
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
    from moe_kernels.gemm_config import distinct_schedules
    from moe_kernels.grouped_mm_experts import grouped_mm_unavailable

    z_TD = args[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in args[:4])
    names = [f"triton:{s.name}" for s in distinct_schedules(z_TD.dtype, z_TD.device, grad)]
    if grouped_mm_unavailable(z_TD.device, z_TD.dtype) is None:
        names.append("grouped_mm")
    return [*names, "torch"]


def moe_ffn_implementation(backend: str, device: torch.device, num_experts: int, args: tuple | None = None):
    """The moe_ffn that runs a request: reference.moe_ffn, the Triton functions.moe_ffn (on the
    default schedule, or the one auto chose) or grouped_mm_experts.moe_ffn (imported only when
    chosen). All take (z, router, w1, w2, top_k, mask, balance_p). With `args` (that call's
    inputs), "auto" on CUDA picks among auto_candidates by timing (choose_auto)."""
    name = resolve_backend(backend, device, num_experts)
    if name == "triton" and not triton_has_tensor_cores(device):  # only a request for "triton" gets here
        sm = "".join(map(str, cuda_capability(device)))
        warnings.warn(
            f"backend='triton' on {torch.cuda.get_device_name(device)} (sm_{sm}): Triton has no tensor-core "
            "dot below sm_80 (triton-lang/triton#5066), so the expert GEMMs run on fp32 FMA (a T4's datasheet peak: "
            "8 TFLOPS, against 65 on the tensor cores cuBLAS uses); backend='torch' or 'auto' runs cuBLAS",
            stacklevel=3,
        )
    if backend == "auto" and name == "triton" and args is not None and os.environ.get(AUTO_PIN_ENV) != "triton":
        names = auto_candidates(args)
        candidates = {c: functools.partial(_cuda_seconds, _implementation(c), args) for c in names}
        name = choose_auto(shape_class(args), candidates)
    return _implementation(name)


def auto_choices() -> dict:
    """{shape class: backend} that "auto" chose (or read) in this process: what ran, for reports."""
    return dict(_choices_this_process())
