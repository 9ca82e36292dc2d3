"""`moe_ffn` as torch.library custom ops, so torch.compile sees one opaque node, not a graph break.

Shape legend: T tokens, D token width, F expert hidden width, E experts, K experts per token.

    moe_adapter::moe_ffn(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T?, top_k, balance_p, backend)
        -> (h_TD, aux_loss, counts_E, topk_idx_TK, topk_weight_TK)
    moe_adapter::moe_ffn_backward(<same inputs>, dh_TD, d_aux, d_weight_TK)
        -> (dz_TD, drouter_ED, dw1_EDF, dw2_EFD)
    moe_adapter::moe_ffn_saving(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T?, top_k, balance_p, schedule)
        -> (the five outputs above, then what the backward reads: gact_RF, pre_RF, offsets_E1,
            sorted_pair_R, pair_row_TK, dp_E)                              Triton backend only
    moe_adapter::moe_ffn_saved_backward(z, router, w1, w2, <saved>, top_k, balance_p, schedule, dh_TD, d_aux,
        d_weight_TK) -> (dz_TD, drouter_ED, dw1_EDF, dw2_EFD)

Every output's shape follows from the inputs' shapes (dropless routing: h is (T, D) whatever the
router picks), so the fake implementations are exact and the compiled graph keeps static shapes.
The implementations call the eager paths (`reference.reference_moe_ffn` or `functions.triton_moe_ffn`),
chosen inside the op, so backend selection never runs under dynamo.

Backward under torch.compile: on the Triton backend the forward keeps what the eager backward
keeps (G * act and pre, the permutation, the balance loss's dL/dp) as extra outputs of
`moe_ffn_saving`, and `moe_ffn_saved_backward` runs the backward kernels on them: no expert
forward is recomputed. With `recompute=True` (MoEAdapterConfig.compile_recompute), and always on
the torch backend, `moe_ffn_backward` recomputes the routed-expert forward and differentiates it
with autograd: the expert block is checkpointed (one extra expert forward, no (T*K, F)
activations kept between forward and backward). Eager calls do not go through these ops
(ops.moe_ffn uses them only while compiling).
"""

from __future__ import annotations

import torch

from moe_kernels import reference
from moe_kernels.backend import moe_ffn_implementation, resolve_backend

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


def _unused_as_zeros(z_TD, w2_EFD, top_k, dh_TD, d_aux, d_weight_TK):
    """Gradients of outputs the loss did not use arrive as None: zeros of the outputs' shapes
    (h is (T, N): N, the experts' output width, is D only in the serial layout)."""
    acc = reference.routing_dtype(z_TD.dtype)
    if dh_TD is None:
        dh_TD = z_TD.new_zeros(z_TD.shape[0], w2_EFD.shape[2])
    if d_aux is None:
        d_aux = z_TD.new_zeros((), dtype=acc)
    if d_weight_TK is None:
        d_weight_TK = z_TD.new_zeros(z_TD.shape[0], top_k, dtype=acc)
    return dh_TD, d_aux, d_weight_TK


def _setup_context(ctx, inputs, output):
    z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend = inputs
    ctx.save_for_backward(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T)
    ctx.config = (top_k, balance_p, backend)
    ctx.mark_non_differentiable(output[2], output[3])


def _backward(ctx, dh_TD, d_aux, d_counts, d_idx, d_weight_TK):
    z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T = ctx.saved_tensors
    top_k, balance_p, backend = ctx.config
    dh_TD, d_aux, d_weight_TK = _unused_as_zeros(z_TD, w2_EFD, top_k, dh_TD, d_aux, d_weight_TK)
    grads = moe_ffn_backward_op(
        z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, backend, dh_TD, d_aux, d_weight_TK
    )
    return (*grads, None, None, None, None)


moe_ffn_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ saved activations (Triton)


@torch.library.custom_op("moe_adapter::moe_ffn_saving", mutates_args=())
def moe_ffn_saving_op(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    mask_T: torch.Tensor | None,
    top_k: int,
    balance_p: str,
    schedule: str,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    from moe_kernels import grouped_gemm, permutation, routing
    from moe_kernels.gemm_config import Schedule

    logits_TE = torch.nn.functional.linear(z_TD, router_weight_ED)
    r = routing.router_forward(logits_TE, top_k, mask_T, balance_p)
    counts_E, dp_E, aux = routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, top_k)
    perm = permutation.permute(r.topk_idx_TK, counts_E, r.blk_count_NE)
    h_TD, saved = grouped_gemm.experts_forward(
        z_TD, w1_EDF, w2_EFD, r.topk_weight_TK, perm, save_pre=True, schedule=Schedule.parse(schedule)
    )
    gact_RF, pre_RF, sorted_pair_R = saved.gact_RF, saved.pre_RF, perm.sorted_pair_R
    if mask_T is not None:
        # Rows past offsets[E] (pairs of masked tokens) are unspecified; a custom op's outputs must
        # be a function of its inputs, so they are zeroed (without a mask every row is real).
        real_R = torch.arange(sorted_pair_R.shape[0], device=z_TD.device) < perm.offsets_E1[-1]
        sorted_pair_R = torch.where(real_R, sorted_pair_R, 0)
        gact_RF, pre_RF = (torch.where(real_R[:, None], t, 0) for t in (gact_RF, pre_RF))
    return (
        h_TD,
        aux,
        counts_E,
        r.topk_idx_TK,
        r.topk_weight_TK,
        gact_RF,
        pre_RF,
        perm.offsets_E1,
        sorted_pair_R,
        perm.pair_row_TK,
        dp_E,
    )


@moe_ffn_saving_op.register_fake
def _(z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, schedule):
    T = z_TD.shape[0]
    E, _, F = w1_EDF.shape
    R = T * top_k
    acc = reference.routing_dtype(z_TD.dtype)
    i32 = torch.int32
    return (
        z_TD.new_empty(T, w2_EFD.shape[2]),
        z_TD.new_empty((), dtype=acc),
        z_TD.new_empty(E, dtype=i32),
        z_TD.new_empty(T, top_k, dtype=i32),
        z_TD.new_empty(T, top_k, dtype=acc),
        z_TD.new_empty(R, F),
        z_TD.new_empty(R, F),
        z_TD.new_empty(E + 1, dtype=i32),
        z_TD.new_empty(R, dtype=i32),
        z_TD.new_empty(T, top_k, dtype=i32),
        z_TD.new_empty(E, dtype=acc),
    )


@torch.library.custom_op("moe_adapter::moe_ffn_saved_backward", mutates_args=())
def moe_ffn_saved_backward_op(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    counts_E: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    gact_RF: torch.Tensor,
    pre_RF: torch.Tensor,
    offsets_E1: torch.Tensor,
    sorted_pair_R: torch.Tensor,
    pair_row_TK: torch.Tensor,
    dp_E: torch.Tensor,
    top_k: int,
    balance_p: str,
    schedule: str,
    dh_TD: torch.Tensor,
    d_aux: torch.Tensor,
    d_weight_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from moe_kernels import grouped_gemm, routing
    from moe_kernels.gemm_config import Schedule

    perm = reference.Permutation(counts_E, offsets_E1, sorted_pair_R, pair_row_TK)
    saved = grouped_gemm.ExpertActivations(gact_RF, pre_RF)
    dz_TD, dw1, dw2, d_gate_TK = grouped_gemm.experts_backward(
        dh_TD, z_TD, w1_EDF, w2_EFD, topk_weight_TK, perm, saved, (True, True, True, True), Schedule.parse(schedule)
    )
    logits_TE = torch.nn.functional.linear(z_TD, router_weight_ED)  # (T, E): cheaper to redo than keep
    d_weight_TK = d_weight_TK + d_gate_TK.to(d_weight_TK.dtype)
    dlogits_TE = routing.router_backward(logits_TE, topk_idx_TK, topk_weight_TK, d_weight_TK, d_aux, dp_E, balance_p)
    dlogits_TE = dlogits_TE.to(z_TD.dtype)
    return (dz_TD + dlogits_TE @ router_weight_ED).contiguous(), (dlogits_TE.T @ z_TD).contiguous(), dw1, dw2


@moe_ffn_saved_backward_op.register_fake
def _(z_TD, router_weight_ED, w1_EDF, w2_EFD, *rest):
    return tuple(torch.empty_like(t) for t in (z_TD, router_weight_ED, w1_EDF, w2_EFD))


def _setup_saving(ctx, inputs, output):
    z_TD, router_weight_ED, w1_EDF, w2_EFD, mask_T, top_k, balance_p, schedule = inputs
    ctx.save_for_backward(z_TD, router_weight_ED, w1_EDF, w2_EFD, output[2], output[3], output[4], *output[5:])
    ctx.config = (top_k, balance_p, schedule)
    ctx.mark_non_differentiable(*output[2:4], *output[5:])


def _saved_backward(ctx, dh_TD, d_aux, d_counts, d_idx, d_weight_TK, *_):
    z_TD, router_weight_ED, w1_EDF, w2_EFD, counts_E, idx_TK, weight_TK, *saved = ctx.saved_tensors
    top_k, balance_p, schedule = ctx.config
    dh_TD, d_aux, d_weight_TK = _unused_as_zeros(z_TD, w2_EFD, top_k, dh_TD, d_aux, d_weight_TK)
    grads = moe_ffn_saved_backward_op(
        z_TD, router_weight_ED, w1_EDF, w2_EFD, counts_E, idx_TK, weight_TK, *saved, top_k, balance_p, schedule,
        dh_TD, d_aux, d_weight_TK,
    )  # fmt: skip
    return (*grads, None, None, None, None)


moe_ffn_saving_op.register_autograd(_saved_backward, setup_context=_setup_saving)


def custom_op_moe_ffn(
    z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T=None, balance_p="topk", backend="auto", recompute=False
):
    """The custom-op form of ops.moe_ffn (inputs already validated and autocast-resolved). On the
    Triton backend with gradients needed and recompute=False, the op that keeps activations, on
    the default GEMM schedule (gemm_config.default_schedule; auto's timing does not run while
    compiling)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (z_TD, router_weight_ED, w1_EDF, w2_EFD))
    if grad and not recompute and resolve_backend(backend, z_TD.device, w1_EDF.shape[0]) == "triton":
        from moe_kernels.gemm_config import default_schedule

        schedule = default_schedule().name
        out = moe_ffn_saving_op(z_TD, router_weight_ED, w1_EDF, w2_EFD, token_mask_T, top_k, balance_p, schedule)
        return reference.MoEOutput(*out[:5])
    return reference.MoEOutput(
        *moe_ffn_op(z_TD, router_weight_ED, w1_EDF, w2_EFD, token_mask_T, top_k, balance_p, backend)
    )
