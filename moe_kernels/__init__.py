"""Fused Triton kernels for sparse MoE adapters, with a pure-PyTorch reference for every op.

Tensors in, tensors out: nothing here knows about nn.Module or configs. Start at `moe_ffn`
(validation, autocast, backend choice); `reference` holds the ground truth of every op. The Triton
ops below are importable from here too; they load triton on first use only, so `import
moe_kernels` works where triton is not installed (the torch backend then serves every call).
"""

import importlib

from moe_kernels import custom_ops, reference  # custom_ops registers moe_adapter::moe_ffn
from moe_kernels.backend import BACKENDS, resolve_backend
from moe_kernels.ops import moe_ffn
from moe_kernels.platform import MAX_TRITON_EXPERTS
from moe_kernels.reference import BALANCE_MODES, MoEOutput, Permutation

_TRITON_OPS = {
    "router_forward": "moe_kernels.routing",
    "balance_forward": "moe_kernels.routing",
    "router_backward": "moe_kernels.routing",
    "permute": "moe_kernels.permutation",
    "grouped_mm": "moe_kernels.grouped_gemm",
    "grouped_wgrad": "moe_kernels.wgrad",
    "experts_forward": "moe_kernels.grouped_gemm",
    "experts_backward": "moe_kernels.grouped_gemm",
    "RouterFunction": "moe_kernels.functions",
    "ExpertsFunction": "moe_kernels.functions",
}

__all__ = [
    "BACKENDS",
    "BALANCE_MODES",
    "MAX_TRITON_EXPERTS",
    "MoEOutput",
    "Permutation",
    "custom_ops",
    "moe_ffn",
    "reference",
    "resolve_backend",
    *_TRITON_OPS,
]


def __getattr__(name: str):
    if name in _TRITON_OPS:
        return getattr(importlib.import_module(_TRITON_OPS[name]), name)
    raise AttributeError(f"module 'moe_kernels' has no attribute {name!r}")
