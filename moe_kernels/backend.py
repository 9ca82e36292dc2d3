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
import os
import warnings

import torch

from moe_kernels import reference
from moe_kernels.platform import (
    AUTO_PIN_ENV,
    MAX_TRITON_EXPERTS,
    cuda_capability,
    installed_interpreter_incompatibility,
    interpreter_requested,
    triton_available,
    triton_has_tensor_cores,
)

BACKENDS = ("auto", "triton", "torch", "grouped_mm")


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


def implementation(name: str):
    """The moe_ffn of a backend or auto candidate name ("triton:<schedule>": that GEMM schedule).
    The Triton-side modules are imported here, on first use, so that `import moe_kernels` works
    where triton is not installed."""
    if name == "torch":
        return reference.reference_moe_ffn
    if name == "grouped_mm":
        from moe_kernels.grouped_mm_experts import grouped_mm_moe_ffn

        return grouped_mm_moe_ffn
    from moe_kernels.functions import triton_moe_ffn

    if name.startswith("triton:"):
        from moe_kernels.gemm_config import Schedule

        return functools.partial(triton_moe_ffn, schedule=Schedule.parse(name.removeprefix("triton:")))
    return triton_moe_ffn


def moe_ffn_implementation(backend: str, device: torch.device, num_experts: int, args: tuple | None = None):
    """The moe_ffn that runs a request: reference_moe_ffn, the Triton triton_moe_ffn (on the
    default schedule, or the one auto chose) or grouped_mm_moe_ffn (imported only when chosen).
    All take (z, router, w1, w2, top_k, mask, balance_p). With `args` (that call's inputs),
    "auto" on CUDA picks among auto.auto_candidates by timing (auto.choose_auto)."""
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
        from moe_kernels import auto  # imports the Triton GEMM configs: on CUDA only

        candidates = {
            c: functools.partial(auto.cuda_seconds, implementation(c), args) for c in auto.auto_candidates(args)
        }
        name = auto.choose_auto(auto.shape_class(args), candidates)
    return implementation(name)
