"""Fused Triton kernels for sparse MoE adapters, with a pure-PyTorch reference for every op.

Tensors in, tensors out: nothing here knows about nn.Module or configs. Start at `moe_ffn`.
"""

from moe_kernels import reference
from moe_kernels.backend import BACKENDS, MAX_TRITON_EXPERTS, resolve_backend
from moe_kernels.ops import moe_ffn
from moe_kernels.reference import BALANCE_MODES, MoEOutput, Permutation

__all__ = [
    "BACKENDS",
    "BALANCE_MODES",
    "MAX_TRITON_EXPERTS",
    "MoEOutput",
    "Permutation",
    "moe_ffn",
    "reference",
    "resolve_backend",
]
