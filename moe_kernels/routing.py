"""Fused top-k gating with the balance-loss statistics, the balance-loss reduction, and their backward.

Shape legend: T tokens, E experts (E <= 128), K experts per token, NB = cdiv(T, BLOCK_T) token
blocks. Semantics: reference.topk_route and reference.balance_loss.

  _router_fwd_kernel    one pass over the logits (T, E): top-k indices and weights (softmax over
                        the kept k, ties to the lower index, NaN ranks as -inf), and per token
                        block the expert histogram (NB, E) and the sum of p (NB, E).
  _balance_fwd_kernel   one program folds the NB partials in a fixed order: counts (E), the
                        balance loss L_aux = E * sum_e P_e f_e, and dL_aux/dp = E f_e / B.
  _router_bwd_kernel    d(weights) (T, K) and d(L_aux) -> d(logits) (T, E) in one pass.

Nothing here synchronizes with the host and nothing uses atomics: the same inputs give the same
bits. The per-block histogram doubles as the input of the stable permutation (permutation.py), which
is why the token blocking (`router_block_t`) is shared with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_kernels.platform import MAX_TRITON_EXPERTS, interpreter_requested
from moe_kernels.reference import BALANCE_MODES, routing_dtype

# Elements of the (BLOCK_T, BLOCK_E) logits tile one program holds: 4096 fp32 values is 32 per
# thread at 4 warps, which keeps the k-step selection loop in registers even at E = 128.
_TILE_ELEMS = 4096
# The interpreter runs one program at a time; small token blocks there make the CPU tests cross
# many block boundaries (the permutation's block prefix is only tested when NB > 1).
_INTERPRET_BLOCK_T = 16
# Rows of the (NB, E) partials folded per step of the single-program reductions.
_REDUCE_ROWS = 64


def expert_block(num_experts: int) -> int:
    """Power-of-two tile width that holds E experts (the scan and GEMM kernels use it too)."""
    return max(2, triton.next_power_of_2(num_experts))


def router_block_t(num_experts: int) -> int:
    """Tokens per router program; permutation.py must block tokens the same way."""
    if interpreter_requested():
        return _INTERPRET_BLOCK_T
    return max(16, min(256, _TILE_ELEMS // expert_block(num_experts)))


def reduce_rows(num_experts: int) -> int:
    """Rows of an (NB, E) partials array folded per step by the single-program reductions."""
    if interpreter_requested():
        return 4  # several steps even at test sizes, so the loop carry is tested
    return max(1, min(_REDUCE_ROWS, _TILE_ELEMS // expert_block(num_experts)))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _load_logits(logits_ptr, offs_t64, offs_e, t_in, e_in, stride_lt, stride_le, ACC: tl.constexpr):
    """(BLOCK_T, BLOCK_E) logits in ACC: rows past T read as 0 (finite, so no inf - inf below),
    columns past E as -inf (never selected, zero probability)."""
    logits = tl.load(
        logits_ptr + offs_t64[:, None] * stride_lt + offs_e[None, :] * stride_le,
        mask=t_in[:, None] & e_in[None, :],
        other=0.0,
    ).to(ACC)
    return tl.where(e_in[None, :], logits, float("-inf"))


@triton.jit
def _full_softmax(logits, e_in):
    """softmax over all E experts (GShard's p); a NaN logit makes its row NaN, as in torch."""
    row_max = tl.max(tl.where(logits != logits, float("-inf"), logits), axis=1)
    pe = tl.where(e_in[None, :], tl.exp(logits - row_max[:, None]), 0.0)
    return pe / tl.sum(pe, axis=1)[:, None]


@triton.jit
def _router_fwd_kernel(
    logits_ptr,
    mask_ptr,
    idx_ptr,
    weight_ptr,
    blk_count_ptr,
    blk_psum_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    P_SOFTMAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_in = offs_t < T
    e_in = offs_e < E
    real = t_in
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + offs_t, mask=t_in, other=0) != 0)
    offs_t64 = offs_t.to(tl.int64)
    logits = _load_logits(logits_ptr, offs_t64, offs_e, t_in, e_in, stride_lt, stride_le, ACC)
    key = tl.where(logits != logits, float("-inf"), logits)  # NaN never wins a selection

    # K rounds of "take the best untaken expert, lowest index on ties". `taken` starts with the
    # padding columns so they are never chosen, even when every real logit is -inf.
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32) + tl.where(e_in, 0, 1)[None, :]
    rank = tl.full((BLOCK_T, BLOCK_E), -1, dtype=tl.int32)
    for s in range(K):
        cand = tl.where(taken != 0, float("-inf"), key)
        best = tl.max(cand, axis=1)
        hit = (cand == best[:, None]) & (taken == 0)
        idx = tl.min(tl.where(hit, offs_e[None, :], BLOCK_E), axis=1)
        chosen = offs_e[None, :] == idx[:, None]
        taken = tl.where(chosen, 1, taken)
        rank = tl.where(chosen, s, rank)
        tl.store(idx_ptr + offs_t64 * K + s, tl.where(real, idx, -1), mask=t_in)

    # Softmax over the kept logits; a kept NaN (or all kept -inf) makes the row NaN, as in torch.
    sel = rank >= 0
    row_max = tl.max(tl.where(sel, key, float("-inf")), axis=1)
    ex = tl.where(sel, tl.exp(logits - row_max[:, None]), 0.0)
    weight = tl.where(sel, ex / tl.sum(ex, axis=1)[:, None], 0.0)
    for s in range(K):
        w_s = tl.sum(tl.where(rank == s, weight, 0.0), axis=1)
        tl.store(weight_ptr + offs_t64 * K + s, tl.where(real, w_s, 0.0), mask=t_in)

    # This block's share of the balance statistics (masked tokens excluded).
    counted = sel & real[:, None]
    tl.store(blk_count_ptr + pid * E + offs_e, tl.sum(counted.to(tl.int32), axis=0), mask=e_in)
    p = _full_softmax(logits, e_in) if P_SOFTMAX else weight
    psum = tl.sum(tl.where(real[:, None] & e_in[None, :], p, 0.0), axis=0)
    tl.store(blk_psum_ptr + pid * E + offs_e, psum, mask=e_in)


@triton.jit
def _balance_fwd_kernel(
    blk_count_ptr,
    blk_psum_ptr,
    counts_ptr,
    dp_ptr,
    aux_ptr,
    NB,
    E,
    K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_in = offs_e < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    psum = tl.zeros((BLOCK_E,), dtype=ACC)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        m = (offs_b < NB)[:, None] & e_in[None, :]
        offs = offs_b[:, None] * E + offs_e[None, :]
        counts += tl.sum(tl.load(blk_count_ptr + offs, mask=m, other=0), axis=0)
        psum += tl.sum(tl.load(blk_psum_ptr + offs, mask=m, other=0.0), axis=0)
    # Every real token fills exactly K slots (dropless), so B = pairs / K; max(., 1) keeps an
    # all-padding batch at L_aux = 0 instead of 0/0.
    num_real = tl.maximum(tl.sum(counts, axis=0) // K, 1).to(ACC)
    f = counts.to(ACC) / num_real
    P = psum / num_real
    aux = E * tl.sum(tl.where(e_in, P * f, 0.0), axis=0)
    tl.store(counts_ptr + offs_e, counts, mask=e_in)
    tl.store(dp_ptr + offs_e, E * f / num_real, mask=e_in)  # dL_aux/dp_{b,e} for every real b
    tl.store(aux_ptr, aux)


@triton.jit
def _router_bwd_kernel(
    logits_ptr,
    idx_ptr,
    weight_ptr,
    dweight_ptr,
    dp_ptr,
    daux_ptr,
    dlogits_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    HAS_DWEIGHT: tl.constexpr,
    P_SOFTMAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_in = offs_t < T
    e_in = offs_e < E
    offs_t64 = offs_t.to(tl.int64)
    real = tl.load(idx_ptr + offs_t64 * K, mask=t_in, other=-1) >= 0
    daux = tl.load(daux_ptr).to(ACC)
    dp = tl.load(dp_ptr + offs_e, mask=e_in, other=0.0) * daux  # d(loss)/d p_{b,e}

    # Scatter the K slots back to expert columns: G (weights) and its incoming gradient.
    g = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC)
    dg = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC)
    sel = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    for s in range(K):
        idx_s = tl.load(idx_ptr + offs_t64 * K + s, mask=t_in, other=-1)
        hit = offs_e[None, :] == idx_s[:, None]
        g = tl.where(hit, tl.load(weight_ptr + offs_t64 * K + s, mask=t_in, other=0.0)[:, None], g)
        if HAS_DWEIGHT:
            dw_s = tl.load(dweight_ptr + offs_t64 * K + s, mask=t_in, other=0.0).to(ACC)
            dg = tl.where(hit, dw_s[:, None], dg)
        sel = tl.where(hit, 1, sel)
    selected = sel != 0
    if not P_SOFTMAX:
        dg = tl.where(selected, dg + dp[None, :], dg)  # p = G: the balance loss reads G too
    # Softmax backward over the kept set: dl = G * (dG - <G, dG>); 0 outside it.
    dlogits = tl.where(selected, g * (dg - tl.sum(g * dg, axis=1)[:, None]), 0.0)
    if P_SOFTMAX:
        logits = _load_logits(logits_ptr, offs_t64, offs_e, t_in, e_in, stride_lt, stride_le, ACC)
        p = _full_softmax(logits, e_in)
        dlogits += tl.where(e_in[None, :], p * (dp[None, :] - tl.sum(p * dp[None, :], axis=1)[:, None]), 0.0)
    dlogits = tl.where(real[:, None], dlogits, 0.0)
    tl.store(
        dlogits_ptr + offs_t64[:, None] * E + offs_e[None, :],
        dlogits.to(dlogits_ptr.dtype.element_ty),
        mask=t_in[:, None] & e_in[None, :],
    )


class RouterResult(NamedTuple):
    """topk_idx_TK int32 (-1 for masked tokens), topk_weight_TK (routing dtype), and the per-block
    expert histogram blk_count_NE int32 and p sums blk_psum_NE of `router_block_t(E)` token blocks."""

    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    blk_count_NE: torch.Tensor
    blk_psum_NE: torch.Tensor


def _check_logits(logits_TE: torch.Tensor, top_k: int) -> None:
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE must be a 2-D float tensor, got {logits_TE.dtype} {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= E <= MAX_TRITON_EXPERTS:
        raise ValueError(f"the Triton router handles 1 <= E <= {MAX_TRITON_EXPERTS} experts, got E={E}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E]; got top_k={top_k}, E={E}")
    if T == 0:
        raise ValueError("the Triton router needs T >= 1 tokens (ops.moe_ffn handles T = 0)")


def router_forward(
    logits_TE: torch.Tensor, top_k: int, token_mask_T: torch.Tensor | None, balance_p: str
) -> RouterResult:
    """Top-k routing plus per-block balance statistics in one kernel launch."""
    _check_logits(logits_TE, top_k)
    if balance_p not in BALANCE_MODES:
        raise ValueError(f"balance_p must be one of {BALANCE_MODES}, got {balance_p!r}")
    T, E = logits_TE.shape
    if token_mask_T is not None and (token_mask_T.shape != (T,) or token_mask_T.dtype != torch.bool):
        raise ValueError(f"token_mask_T must be bool ({T},), got {token_mask_T.dtype} {tuple(token_mask_T.shape)}")
    if token_mask_T is not None:
        token_mask_T = token_mask_T.contiguous()  # read at token offsets (a column of a 2-D mask is strided)
    dev = logits_TE.device
    acc = routing_dtype(logits_TE.dtype)
    block_t = router_block_t(E)
    nb = triton.cdiv(T, block_t)
    idx = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    weight = torch.empty(T, top_k, dtype=acc, device=dev)
    blk_count = torch.empty(nb, E, dtype=torch.int32, device=dev)
    blk_psum = torch.empty(nb, E, dtype=acc, device=dev)
    mask_arg = token_mask_T if token_mask_T is not None else idx  # unread when HAS_MASK is False
    _router_fwd_kernel[(nb,)](
        logits_TE,
        mask_arg,
        idx,
        weight,
        blk_count,
        blk_psum,
        T,
        E,
        logits_TE.stride(0),
        logits_TE.stride(1),
        K=top_k,
        HAS_MASK=token_mask_T is not None,
        P_SOFTMAX=balance_p == "softmax",
        BLOCK_T=block_t,
        BLOCK_E=expert_block(E),
        ACC=_acc_dtype(acc),
        num_warps=4,
    )
    return RouterResult(idx, weight, blk_count, blk_psum)


def balance_forward(
    blk_count_NE: torch.Tensor, blk_psum_NE: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold the router's partials: (counts_E int32, dp_E = dL_aux/dp, aux_loss scalar)."""
    if blk_count_NE.shape != blk_psum_NE.shape or blk_count_NE.dtype != torch.int32:
        raise ValueError(
            f"expected blk_count_NE int32 and blk_psum_NE of one shape, got {blk_count_NE.dtype} "
            f"{tuple(blk_count_NE.shape)} and {tuple(blk_psum_NE.shape)}"
        )
    nb, E = blk_count_NE.shape
    blk_count_NE, blk_psum_NE = blk_count_NE.contiguous(), blk_psum_NE.contiguous()  # read row-major
    dev = blk_count_NE.device
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    dp = torch.empty(E, dtype=blk_psum_NE.dtype, device=dev)
    aux = torch.empty((), dtype=blk_psum_NE.dtype, device=dev)
    _balance_fwd_kernel[(1,)](
        blk_count_NE,
        blk_psum_NE,
        counts,
        dp,
        aux,
        nb,
        E,
        K=top_k,
        BLOCK_B=reduce_rows(E),
        BLOCK_E=expert_block(E),
        ACC=_acc_dtype(blk_psum_NE.dtype),
        num_warps=4,
    )
    return counts, dp, aux


def router_backward(
    logits_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    d_topk_weight_TK: torch.Tensor | None,
    d_aux: torch.Tensor,
    dp_E: torch.Tensor,
    balance_p: str,
) -> torch.Tensor:
    """d(logits) from the gradients of the routing weights and of the balance loss."""
    T, E = logits_TE.shape
    top_k = topk_idx_TK.shape[1]
    if topk_idx_TK.shape != (T, top_k) or topk_weight_TK.shape != (T, top_k):
        raise ValueError(
            f"routing tensors must be ({T}, K); got {tuple(topk_idx_TK.shape)}, {tuple(topk_weight_TK.shape)}"
        )
    if d_topk_weight_TK is not None and d_topk_weight_TK.shape != (T, top_k):
        raise ValueError(f"d_topk_weight_TK must be ({T}, {top_k}), got {tuple(d_topk_weight_TK.shape)}")
    # (T, K) and (E,) tensors are read row-major: strided views are copied once (no-op otherwise).
    topk_idx_TK, topk_weight_TK, dp_E = topk_idx_TK.contiguous(), topk_weight_TK.contiguous(), dp_E.contiguous()
    dlogits = torch.empty(T, E, dtype=logits_TE.dtype, device=logits_TE.device)
    block_t = router_block_t(E)
    dw = d_topk_weight_TK.contiguous() if d_topk_weight_TK is not None else topk_weight_TK
    _router_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits_TE,
        topk_idx_TK,
        topk_weight_TK,
        dw,
        dp_E,
        d_aux,
        dlogits,
        T,
        E,
        logits_TE.stride(0),
        logits_TE.stride(1),
        K=top_k,
        HAS_DWEIGHT=d_topk_weight_TK is not None,
        P_SOFTMAX=balance_p == "softmax",
        BLOCK_T=block_t,
        BLOCK_E=expert_block(E),
        ACC=_acc_dtype(topk_weight_TK.dtype),
        num_warps=4,
    )
    return dlogits
