"""Pure-PyTorch ground truth for every op in `moe_kernels`, and the CPU path of the library.

Shape legend: T tokens, D hidden width of a token (the adapter's `d`), F expert hidden width,
E experts, K experts per token (top-k), R = T*K routed (token, slot) pairs. A pair's id is
`p = t*K + s`; a *sorted row* is a pair's position in the expert-sorted order.

Semantics (../shared/DESIGN.md, paper eq. 2-4 and 8-10):
- Router logits `s = z Wg`. Top-k keeps the K largest logits per token, ties to the lower expert
  index; a NaN logit ranks as -inf. G = softmax over the K kept logits, so a kept NaN (a token
  whose z is NaN has only NaN logits) makes that token's weights NaN.
- Expert e: E_e(z) = W2_e SiLU(W1_e z) with W1 stored (E, D, F) and W2 stored (E, F, N); N = D in the
  serial layout, any width otherwise (the parallel layout maps d -> D).
- h = sum over the K selected experts of G_e E_e(z).
- Balance loss over the B real (unmasked) tokens: P_e = mean_b p_{b,e}, f_e = mean_b r_{b,e},
  L_aux = E * sum_e P_e f_e, with p = G ("topk", eq. 8) or p = softmax(s) over all E ("softmax",
  GShard). f carries no gradient. Balanced routing gives L_aux = K in "topk" mode.
- Masked (padding) tokens are routed nowhere: their `topk_idx` is -1, their weights 0, their
  output rows 0, and they are absent from the counts and from B.

Routing math runs in float32 (float64 for float64 inputs) whatever the input dtype. Everything
is vectorized: one sort for the routing, one for the permutation, and one matmul pair per expert
(a Python loop over E, never over tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BALANCE_MODES = ("topk", "softmax")


class Permutation(NamedTuple):
    """The expert-sorted order of the (token, slot) pairs.

    counts_E:      int32 (E,)   pairs routed to each expert (masked tokens excluded).
    offsets_E1:    int32 (E+1,) exclusive prefix sum of counts_E; expert e owns sorted rows
                   [offsets[e], offsets[e+1]).
    sorted_pair_R: int32 (R,)   pair id of each sorted row; rows past offsets[E] are unspecified.
    pair_row_TK:   int32 (T, K) sorted row of each pair, -1 for pairs of masked tokens.
    """

    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    sorted_pair_R: torch.Tensor
    pair_row_TK: torch.Tensor


class MoEOutput(NamedTuple):
    """What every `moe_ffn` implementation returns.

    h_TD:           (T, D) weighted sum of the selected experts' outputs, in z's dtype.
    aux_loss:       scalar balance loss L_aux (float32, float64 for float64 inputs), differentiable.
    counts_E:       int32 (E,) tokens routed to each expert in this call.
    topk_idx_TK:    int32 (T, K) selected experts, best first; -1 for masked tokens.
    topk_weight_TK: (T, K) routing weights G of the selected experts (0 for masked tokens).
    """

    h_TD: torch.Tensor
    aux_loss: torch.Tensor
    counts_E: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing weights and the balance loss are computed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_route(
    logits_TE: torch.Tensor, top_k: int, token_mask_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection (ties to the lower index) and softmax over the kept logits (eq. 3)."""
    logits_TE = logits_TE.to(routing_dtype(logits_TE.dtype))
    # NaN must not win the selection (torch.sort ranks it highest); it still poisons the softmax.
    key_TE = torch.where(torch.isnan(logits_TE), float("-inf"), logits_TE)
    # A stable descending sort keeps equal logits in index order: ties go to the lower expert.
    topk_idx_TK = torch.sort(key_TE, dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weight_TK = torch.softmax(logits_TE.gather(1, topk_idx_TK), dim=-1)
    if token_mask_T is not None:
        keep_T1 = token_mask_T[:, None]
        topk_idx_TK = torch.where(keep_T1, topk_idx_TK, -1)
        topk_weight_TK = torch.where(keep_T1, topk_weight_TK, 0.0)
    return topk_idx_TK.to(torch.int32), topk_weight_TK


def expert_counts(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 (E,) number of pairs routed to each expert; -1 (masked) entries are ignored."""
    flat = topk_idx_TK.reshape(-1).long()
    # Masked pairs land in an extra bin E that is dropped.
    flat = torch.where(flat < 0, num_experts, flat)
    return torch.bincount(flat, minlength=num_experts + 1)[:num_experts].to(torch.int32)


def balance_loss(
    logits_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    num_experts: int,
    balance_p: str = "topk",
) -> torch.Tensor:
    """L_aux = E * sum_e P_e * f_e over the real tokens (eq. 8-10). 0 when no token is real."""
    if balance_p not in BALANCE_MODES:
        raise ValueError(f"balance_p must be one of {BALANCE_MODES}, got {balance_p!r}")
    T = topk_idx_TK.shape[0]
    acc = routing_dtype(logits_TE.dtype)
    real_T = topk_idx_TK[:, 0] >= 0
    num_real = real_T.sum().clamp(min=1).to(acc)
    f_E = expert_counts(topk_idx_TK, num_experts).to(acc) / num_real
    if balance_p == "topk":
        valid_TK = topk_idx_TK >= 0
        p_TE = torch.zeros(T, num_experts, dtype=acc, device=logits_TE.device).scatter_add(
            1, topk_idx_TK.long().clamp(min=0), torch.where(valid_TK, topk_weight_TK.to(acc), 0.0)
        )
    else:
        p_TE = torch.where(real_T[:, None], torch.softmax(logits_TE.to(acc), dim=-1), 0.0)
    P_E = p_TE.sum(0) / num_real
    return num_experts * (P_E * f_E).sum()


def permute(topk_idx_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Stable expert-sorted order of the pairs: within an expert, pairs keep token order."""
    T, K = topk_idx_TK.shape
    flat = topk_idx_TK.reshape(-1).long()
    key = torch.where(flat < 0, num_experts, flat)
    sorted_pair_R = torch.sort(key, stable=True).indices
    counts_E = expert_counts(topk_idx_TK, num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    pair_row = torch.empty_like(sorted_pair_R)
    pair_row[sorted_pair_R] = torch.arange(T * K, device=flat.device)
    pair_row = torch.where(flat < 0, -1, pair_row)
    return Permutation(counts_E, offsets_E1, sorted_pair_R.to(torch.int32), pair_row.view(T, K).to(torch.int32))


def expert_mlp(
    z_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    perm: Permutation,
    top_k: int,
) -> torch.Tensor:
    """Unweighted expert outputs E_e(z_t) for the routed pairs, one row per sorted row (R_real, D)."""
    counts = perm.counts_E.tolist()  # host sync: fine on the reference path
    num_rows = sum(counts)
    tokens_R = perm.sorted_pair_R[:num_rows].long() // top_k
    x_RD = z_TD.index_select(0, tokens_R)  # its backward is one index_add_, not index_put_
    out = []
    for e, x_e in enumerate(torch.split(x_RD, counts)):
        if x_e.shape[0]:
            out.append(F.silu(x_e @ w1_EDF[e]) @ w2_EFD[e])
    if not out:
        return z_TD.new_zeros(0, w2_EFD.shape[-1])
    return torch.cat(out)


def combine(y_RD: torch.Tensor, perm: Permutation, topk_weight_TK: torch.Tensor) -> torch.Tensor:
    """h_t = sum_s G_{t,s} y_{row(t,s)} (eq. 4), summed in the routing dtype, returned in y's dtype.

    Rows are weighted, copied to their pair's slot (unique slots: deterministic on every device),
    and each token's K slots summed in order. Slots of masked tokens stay zero.
    """
    T, K = perm.pair_row_TK.shape
    num_rows, out_dtype = y_RD.shape[0], y_RD.dtype
    pairs_R = perm.sorted_pair_R[:num_rows].long()
    weight_R = topk_weight_TK.reshape(-1).index_select(0, pairs_R)
    y_RD = y_RD.to(topk_weight_TK.dtype) * weight_R[:, None]
    slots = y_RD.new_zeros(T * K, y_RD.shape[1]) if num_rows < T * K else y_RD.new_empty(T * K, y_RD.shape[1])
    # In place: the out-of-place index_copy first clones the fresh buffer, a (T*K, D) copy (2.5 of
    # the 43 ms of the demo's MoE adapter fwd+bwd in torch.profiler, 1 thread, 2-core Xeon,
    # 2026-12-03; the same bits either way). Only y_RD needs a gradient.
    h_TD = slots.index_copy_(0, pairs_R, y_RD).view(T, K, -1).sum(1)
    return h_TD.to(out_dtype)


def reference_moe_ffn(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
    balance_p: str = "topk",
) -> MoEOutput:
    """The routed-expert part of the MoE adapter (eq. 2-4) plus its balance loss (eq. 8-10)."""
    E = w1_EDF.shape[0]
    logits_TE = F.linear(z_TD, router_weight_ED)
    topk_idx_TK, topk_weight_TK = topk_route(logits_TE, top_k, token_mask_T)
    perm = permute(topk_idx_TK, E)
    aux = balance_loss(logits_TE, topk_idx_TK, topk_weight_TK, E, balance_p)
    y_RD = expert_mlp(z_TD, w1_EDF, w2_EFD, perm, top_k)
    h_TD = combine(y_RD, perm, topk_weight_TK)
    return MoEOutput(h_TD, aux, perm.counts_E, topk_idx_TK, topk_weight_TK)
