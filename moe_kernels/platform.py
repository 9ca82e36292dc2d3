"""Facts about this machine that the kernels and dispatch ask: is triton installed, did the user ask
for its interpreter, which tensor-core path does tl.dot compile to on a GPU's sm. The bottom of
moe_kernels: it imports nothing of the package, and everything else may import it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

# What the environment asks of dispatch (read by backend.py and auto.py).
AUTO_PIN_ENV = "MOE_ADAPTER_AUTO_BACKEND"  # a candidate name, or "triton": auto runs it without timing

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


# The values Triton 3.9's getenv_bool reads as true (any case); "0", "false", "off", "no" and unset are false.
_TRUE = ("1", "true", "yes", "on")


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


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
