"""torch.autograd.Functions over the Triton kernels, and `triton_moe_ffn`, the Triton path of ops.moe_ffn.

Shape legend: T tokens, D token width, F expert hidden width, E experts, K experts per token.

    logits_TE = z_TD @ router_weight_ED^T                     (torch matmul: E is small)
    RouterFunction:  logits -> topk_weight_TK, aux_loss       (routing.py; + idx, counts, partials)
    permute:         idx, counts, partials -> Permutation      (permutation.py; not differentiable)
    ExpertsFunction: z, w1, w2, topk_weight -> h_TD            (grouped_gemm.py)

The weights' gradient reaches the router through ExpertsFunction's d(topk_weight) and the balance
loss through RouterFunction's d(aux); both meet in one router-backward kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels import grouped_gemm, permutation, routing
from moe_kernels.gemm_config import Schedule, default_schedule
from moe_kernels.reference import MoEOutput, Permutation


def _no_double_backward() -> None:
    """Under create_graph=True (gradient penalties, double backward) grad mode is on inside
    backward; the kernels' backward is not itself differentiable, so refuse rather than return
    gradients that silently miss their second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the Triton MoE kernels have no double backward (create_graph=True, e.g. a gradient "
            "penalty): use backend='torch', whose ops support it"
        )


class RouterFunction(torch.autograd.Function):
    """logits_TE -> (topk_weight_TK, aux_loss, topk_idx_TK, counts_E, blk_count_NE)."""

    @staticmethod
    def forward(ctx, logits_TE, token_mask_T, top_k, balance_p):
        r = routing.router_forward(logits_TE, top_k, token_mask_T, balance_p)
        counts, dp, aux = routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, top_k)
        ctx.save_for_backward(logits_TE, r.topk_idx_TK, r.topk_weight_TK, dp)
        ctx.balance_p = balance_p
        ctx.mark_non_differentiable(r.topk_idx_TK, counts, r.blk_count_NE)
        return r.topk_weight_TK, aux, r.topk_idx_TK, counts, r.blk_count_NE

    @staticmethod
    def backward(ctx, d_weight, d_aux, *_):
        _no_double_backward()
        logits, idx, weight, dp = ctx.saved_tensors
        if d_aux is None:
            d_aux = torch.zeros((), dtype=weight.dtype, device=weight.device)
        dlogits = routing.router_backward(logits, idx, weight, d_weight, d_aux, dp, ctx.balance_p)
        return dlogits, None, None, None


class ExpertsFunction(torch.autograd.Function):
    """(z_TD, w1_EDF, w2_EFD, topk_weight_TK) -> h_TD for a fixed permutation."""

    @staticmethod
    def forward(
        ctx, z_TD, w1_EDF, w2_EFD, topk_weight_TK, counts_E, offsets_E1, sorted_pair_R, pair_row_TK, save_pre, schedule
    ):
        perm = Permutation(counts_E, offsets_E1, sorted_pair_R, pair_row_TK)
        h, saved = grouped_gemm.experts_forward(
            z_TD, w1_EDF, w2_EFD, topk_weight_TK, perm, save_pre=save_pre, schedule=schedule
        )
        ctx.save_for_backward(z_TD, w1_EDF, w2_EFD, topk_weight_TK, *perm, saved.gact_RF, saved.pre_RF)
        ctx.schedule = schedule  # the backward runs the forward's schedule, whatever the env says by then
        return h

    @staticmethod
    def backward(ctx, dh_TD):
        _no_double_backward()
        z, w1, w2, weight, counts, offsets, sorted_pair, pair_row, gact, pre = ctx.saved_tensors
        perm = Permutation(counts, offsets, sorted_pair, pair_row)
        saved = grouped_gemm.ExpertActivations(gact, pre)
        grads = grouped_gemm.experts_backward(
            dh_TD, z, w1, w2, weight, perm, saved, needs=tuple(ctx.needs_input_grad[:4]), schedule=ctx.schedule
        )
        return (*grads, None, None, None, None, None, None)


def route(z_TD, router_weight_ED, top_k, token_mask_T, balance_p):
    """Router and permutation, differentiable through the routing weights and the balance loss:
    (topk_weight_TK, aux_loss, topk_idx_TK, counts_E, Permutation). Shared by every backend whose
    router is the Triton one."""
    logits_TE = F.linear(z_TD, router_weight_ED)
    weight_TK, aux, idx_TK, counts_E, blk_count_NE = RouterFunction.apply(logits_TE, token_mask_T, top_k, balance_p)
    return weight_TK, aux, idx_TK, counts_E, permutation.permute(idx_TK, counts_E, blk_count_NE)


def triton_moe_ffn(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
    balance_p: str = "topk",
    *,
    schedule: Schedule | None = None,
) -> MoEOutput:
    """The Triton implementation of reference.reference_moe_ffn (inputs already validated by ops.moe_ffn),
    on `schedule`'s GEMMs (default: gemm_config.default_schedule(), from the environment)."""
    schedule = default_schedule() if schedule is None else schedule
    weight_TK, aux, idx_TK, counts_E, perm = route(z_TD, router_weight_ED, top_k, token_mask_T, balance_p)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (z_TD, w1_EDF, w2_EFD, weight_TK))
    h_TD = ExpertsFunction.apply(z_TD, w1_EDF, w2_EFD, weight_TK, *perm, save_pre, schedule)
    return MoEOutput(h_TD, aux, counts_E, idx_TK, weight_TK)
