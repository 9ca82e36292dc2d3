"""The one place that decides which implementation runs an op.

- "triton": the fused Triton kernels. On CUDA tensors they compile for the GPU; on CPU tensors they
  run in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment *before* triton
  is imported (that is how CI tests the real kernels without a GPU).
- "torch": the pure-PyTorch reference (`reference.py`), on any device.
- "auto": "triton" on CUDA when triton imports and E <= MAX_TRITON_EXPERTS, else "torch". On CPU
  "auto" is always "torch": the interpreter is a test vehicle, hundreds of times slower.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

BACKENDS = ("auto", "triton", "torch")

# The router kernel holds a (tokens x experts) tile in registers; past 128 experts it spills.
MAX_TRITON_EXPERTS = 128


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


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


@functools.cache
def installed_interpreter_incompatibility() -> str | None:
    """interpreter_incompatibility() for the installed triton and numpy."""
    import numpy

    return interpreter_incompatibility(importlib.metadata.version("triton"), numpy.__version__)


def resolve_backend(backend: str, device: torch.device, num_experts: int) -> str:
    """Return "triton" or "torch" for a request, or raise ValueError saying why it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_triton = device.type == "cuda" and triton_available() and num_experts <= MAX_TRITON_EXPERTS
        return "triton" if use_triton else "torch"
    if not triton_available():
        raise ValueError("backend='triton' but the triton package is not installed")
    if num_experts > MAX_TRITON_EXPERTS:
        raise ValueError(
            f"backend='triton' supports at most {MAX_TRITON_EXPERTS} experts, got num_experts={num_experts}"
        )
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not interpreter_requested():
            raise ValueError(
                "backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                "in the environment before triton is imported, or use backend='torch'"
            )
        if reason := installed_interpreter_incompatibility():
            raise ValueError(reason)
        return "triton"
    raise ValueError(f"backend='triton' runs on CUDA or (interpreted) CPU tensors, got device {device}")


def moe_ffn_implementation(backend: str, device: torch.device, num_experts: int):
    """The moe_ffn that runs a request: reference.moe_ffn or the Triton functions.moe_ffn (which
    imports triton, so only when chosen). Both take (z, router, w1, w2, top_k, mask, balance_p)."""
    if resolve_backend(backend, device, num_experts) == "torch":
        from moe_kernels import reference

        return reference.moe_ffn
    from moe_kernels import functions

    return functions.moe_ffn
