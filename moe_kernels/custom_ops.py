"""`moe_ffn` as torch.library custom ops, so torch.compile sees one opaque node, not a graph break.

Shape legend: T tokens, D token width, F expert hidden width, E experts, K experts per token.

    moe_adapter::moe_ffn(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T?, top_k, balance_p, backend)
        -> (h_TD, aux_loss, counts_E, topk_idx_TK, topk_weight_TK)
    moe_adapter::moe_ffn_backward(<same inputs>, dh_TD, d_aux, d_weight_TK)
        -> (dz_TD, drouter_ED, dw1_EDF, dw2_EFD)

Every output's shape follows from the inputs' shapes (dropless routing: h is (T, D) whatever the
router picks), so the fake implementations are exact and the compiled graph keeps static shapes.
The implementations call the eager paths (`reference.moe_ffn` or the Triton `functions.moe_ffn`),
chosen inside the op, so backend selection never runs under dynamo.

The backward op recomputes the routed-expert forward of the chosen backend and differentiates it
with autograd (the Triton backend's autograd Functions run their backward kernels), so under
torch.compile the expert block is checkpointed: one extra expert forward in backward, no saved
(T*K, F) activations. Eager calls do not go through these ops (ops.moe_ffn uses them only while
compiling) and keep the saved-activation backward.
"""

from __future__ import annotations

import torch

from moe_kernels import reference
from moe_kernels.backend import moe_ffn_implementation

_AUTOGRAD_KEYS = [
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor,
    torch._C.DispatchKey.ADInplaceOrView,
]


def _autograd_dispatch():
    """A compiled backward (and the dispatcher below autograd) runs this op with the autograd keys
    excluded; this op differentiates its own recomputed forward, so it turns them back on for its
    own ops."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude - torch._C.DispatchKeySet(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _eager(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend):
    impl = moe_ffn_implementation(backend, z_TD.device, w1_EDF.shape[0])
    return impl(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, mask_T, balance_p)


@torch.library.custom_op("moe_adapter::moe_ffn", mutates_args=())
def moe_ffn_op(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    mask_T: torch.Tensor | None,
    top_k: int,
    balance_p: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = _eager(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend)
    return tuple(t.contiguous() for t in out)


@moe_ffn_op.register_fake
def _(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend):
    T = z_TD.shape[0]
    E, N = w1_EDF.shape[0], w2_EFD.shape[2]  # experts map D -> N (N = D in the serial layout)
    acc = reference.routing_dtype(z_TD.dtype)
    return (
        z_TD.new_empty(T, N),
        z_TD.new_empty((), dtype=acc),
        z_TD.new_empty(E, dtype=torch.int32),
        z_TD.new_empty(T, top_k, dtype=torch.int32),
        z_TD.new_empty(T, top_k, dtype=acc),
    )


@torch.library.custom_op("moe_adapter::moe_ffn_backward", mutates_args=())
def moe_ffn_backward_op(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    mask_T: torch.Tensor | None,
    top_k: int,
    balance_p: str,
    backend: str,
    dh_TD: torch.Tensor,
    d_aux: torch.Tensor,
    d_weight_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    leaves = [t.detach().requires_grad_(True) for t in (z_TD, router_weight_ED, w1_EDF, w2_EFD)]
    with torch.enable_grad(), _autograd_dispatch():
        out = _eager(*leaves, mask_T, top_k, balance_p, backend)
        grads = torch.autograd.grad(
            (out.h_TD, out.aux_loss, out.topk_weight_TK),
            leaves,
            grad_outputs=(dh_TD, d_aux, d_weight_TK),
            allow_unused=True,
        )
    return tuple(torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip(grads, leaves, strict=True))


@moe_ffn_backward_op.register_fake
def _(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend, dh_TD, d_aux, d_weight_TK):
    return tuple(torch.empty_like(t) for t in (z_TD, router_weight_ED, w1_EDF, w2_EFD))


def _setup_context(ctx, inputs, output):
    z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend = inputs
    ctx.save_for_backward(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T)
    ctx.config = (top_k, balance_p, backend)
    ctx.mark_non_differentiable(output[2], output[3])


def _backward(ctx, dh_TD, d_aux, d_counts, d_idx, d_weight_TK):
    z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T = ctx.saved_tensors
    top_k, balance_p, backend = ctx.config
    # Outputs the loss did not use arrive as None: zeros of their fake shapes.
    if dh_TD is None:
        dh_TD = torch.zeros_like(z_TD)
    if d_aux is None:
        d_aux = z_TD.new_zeros((), dtype=reference.routing_dtype(z_TD.dtype))
    if d_weight_TK is None:
        d_weight_TK = z_TD.new_zeros(z_TD.shape[0], top_k, dtype=reference.routing_dtype(z_TD.dtype))
    grads = moe_ffn_backward_op(
        z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend, dh_TD, d_aux, d_weight_TK
    )
    return (*grads, None, None, None, None)


moe_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def moe_ffn(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T=None, balance_p="topk", backend="auto"):
    """The custom-op form of ops.moe_ffn (inputs already validated and autocast-resolved)."""
    return reference.MoEOutput(
        *moe_ffn_op(z_TD, router_weight_ED, w1_EDF, w2_EFD, token_mask_T, top_k, balance_p, backend)
    )
