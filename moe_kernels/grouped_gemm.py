"""Grouped expert GEMMs, forward and backward: gather rows on load, scatter rows on store.

Shape legend: T tokens, D token width, F expert hidden width, E experts, K experts per token,
R = T*K pairs (pair id p = t*K + s; a sorted row is a pair's place in expert order, permutation.py).
Weights: W1 (E, D, F), W2 (E, F, N): N = D in the serial layout, the LLM width in the parallel one
(any N; "D" below is the output width where it differs). Semantics: reference.expert_mlp, reference.combine.

Forward
  up    pre_RF = z[token(r)] @ W1[e]          A rows gathered from z by token: no (R, D) copy of z
        gact_RF = G_p * SiLU(pre_RF)          epilogue scales by the routing weight; pre is kept
                                              only when a backward will run
  down  y_PD[p] = gact_RF[r] @ W2[e]          epilogue stores the row at its pair id, so no two
                                              programs write a row
  combine h_TD[t] = sum_s y_PD[t*K + s]       fixed order over s: no float atomics, same bits
Backward (dh_TD given)
  down-dX  g = dh[token(r)] @ W2[e]^T; dG_p = <g, SiLU(pre_r)> (recomputed from pre; per N-tile
           partials, summed in a fixed order); dpre_RF = G_p * g * SiLU'(pre)
  up-dX    dz_PD[p] = dpre_RF[r] @ W1[e]^T, then combine -> dz_TD
  dW1[e] = sum_{r in e} z[token(r)]^T dpre_r    wgrad.py: per (output tile, chunk of the expert's
  dW2[e] = sum_{r in e} gact_r^T dh[token(r)]   rows), partials summed in chunk order: no atomics
Schedule (gemm_config.Schedule, chosen per call; the forward's runs its backward): the four row
GEMMs on this file's tile kernel or persistent_gemm's, the weight gradients split or not.
The forward keeps G * act rather than act: dW2 is then a plain GEMM of two loaded tiles (scaling
Y by G in registers each step made its main loop wait on its own wgmma: benchmarks/inspect_sm90),
and the dSiLU epilogue reads pre alone (act = SiLU(pre) is recomputed).

Inputs bf16, fp16 or fp32 (fp64 for tests), accumulation in fp32 (fp64 for fp64). fp32 operands
use IEEE products unless torch allows TF32 for matmuls. Row indices are widened to int64 before
they meet a stride, so R*D and T*D may pass 2**31.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_kernels import persistent_gemm
from moe_kernels.epilogues import store_epilogue
from moe_kernels.gemm_config import (  # noqa: F401 (EPI_* are this kernel's epilogues, named here for callers)
    BUILTIN_SCHEDULE,
    EPI_DSILU,
    EPI_SCATTER,
    EPI_SILU,
    Schedule,
    acc_dtype,
    gemm_config,
    precision,
    row_major,
    runs_persistent,
    upcast,
)
from moe_kernels.permutation import ChunkTables, tile_of
from moe_kernels.platform import interpreter_requested
from moe_kernels.reference import Permutation
from moe_kernels.routing import expert_block
from moe_kernels.wgrad import grouped_wgrad


@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    pre_ptr,
    weight_ptr,
    dw_part_ptr,
    counts_ptr,
    sorted_pair_ptr,
    N,
    KD,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_PRE: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out = A_rows @ B[e] for one (BLOCK_M sorted rows of expert e) x (BLOCK_N columns) tile."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    # N fastest: the programs of one M tile run together and share its gathered A rows in L2.
    pid_m = pid // num_n
    pid_n = pid % num_n
    expert, first_row, row_end = tile_of(pid_m, counts_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    offs_m = first_row + tl.arange(0, BLOCK_M)
    m_in = offs_m < row_end
    pair = tl.load(sorted_pair_ptr + offs_m, mask=m_in, other=0)
    a_rows = (pair // TOP_K).to(tl.int64) if GATHER_A else offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, KD, BLOCK_K):
        k_in = offs_k < KD - k0
        a = tl.load(a_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    store_epilogue(
        acc,
        offs_m,
        m_in,
        offs_n,
        n_in,
        pair,
        pid_n,
        num_n,
        out_ptr,
        pre_ptr,
        weight_ptr,
        dw_part_ptr,
        stride_om,
        stride_on,
        EPILOGUE,
        STORE_PRE,
        SCALE,
        ACC,
    )


@triton.jit
def _combine_kernel(
    y_ptr,
    pair_row_ptr,
    out_ptr,
    T,
    N,
    stride_ym,
    stride_yn,
    stride_ot,
    stride_on,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[t] = sum_s y[t*K + s] over the token's routed slots, s = 0..K-1 in order."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_in = offs_t < T
    n_in = offs_n < N
    offs_t64 = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
    for s in range(TOP_K):
        pair = offs_t64 * TOP_K + s
        routed = tl.load(pair_row_ptr + pair, mask=t_in, other=-1) >= 0
        v = tl.load(
            y_ptr + pair[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            mask=routed[:, None] & n_in[None, :],
            other=0.0,
        )
        acc += v.to(ACC)
    tl.store(
        out_ptr + offs_t64[:, None] * stride_ot + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=t_in[:, None] & n_in[None, :],
    )


@triton.jit
def _dweight_kernel(
    dw_part_ptr,
    pair_row_ptr,
    dweight_ptr,
    NUM_PAIRS,
    NUM_PARTS,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """dG[p] = sum_j dw_part[row(p), j] in order j = 0.. (0 for pairs of masked tokens)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = offs_p < NUM_PAIRS
    row = tl.load(pair_row_ptr + offs_p, mask=p_in, other=-1)
    routed = row >= 0
    offs_j = tl.arange(0, BLOCK_J)
    part = tl.load(
        dw_part_ptr + row.to(tl.int64)[:, None] * NUM_PARTS + offs_j[None, :],
        mask=routed[:, None] & (offs_j < NUM_PARTS)[None, :],
        other=0.0,
    )
    tl.store(dweight_ptr + offs_p, tl.sum(part, axis=1), mask=p_in)


# ----------------------------------------------------------------------------- host wrappers


def _check_expert_inputs(z_TD, w1_EDF, w2_EFD, topk_weight_TK, perm: Permutation) -> None:
    if z_TD.dim() != 2 or w1_EDF.dim() != 3 or w2_EFD.dim() != 3:
        raise ValueError(
            f"expected z_TD (T, D), w1_EDF (E, D, F), w2_EFD (E, F, D); got {tuple(z_TD.shape)}, "
            f"{tuple(w1_EDF.shape)}, {tuple(w2_EFD.shape)}"
        )
    T, D = z_TD.shape
    E, D1, F = w1_EDF.shape
    if D1 != D or tuple(w2_EFD.shape[:2]) != (E, F):
        raise ValueError(
            f"w1_EDF {tuple(w1_EDF.shape)} / w2_EFD {tuple(w2_EFD.shape)} do not fit z_TD (T, {D}): "
            "expected (E, D, F) and (E, F, N)"
        )
    if z_TD.dtype != w1_EDF.dtype or z_TD.dtype != w2_EFD.dtype:
        raise ValueError(f"z, w1, w2 dtypes differ: {z_TD.dtype}, {w1_EDF.dtype}, {w2_EFD.dtype}")
    if z_TD.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"unsupported dtype {z_TD.dtype}")
    K = perm.pair_row_TK.shape[1]
    if topk_weight_TK.shape != (T, K) or perm.pair_row_TK.shape != (T, K) or perm.counts_E.shape != (E,):
        raise ValueError(
            f"routing does not fit: T={T}, E={E}, topk_weight {tuple(topk_weight_TK.shape)}, "
            f"pair_row {tuple(perm.pair_row_TK.shape)}, counts {tuple(perm.counts_E.shape)}"
        )
    devices = {t.device for t in (z_TD, w1_EDF, w2_EFD, topk_weight_TK, perm.sorted_pair_R)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def grouped_mm(
    a: torch.Tensor,
    b_E: torch.Tensor,
    perm: Permutation,
    top_k: int,
    *,
    gather_a: bool,
    epilogue: int,
    out_rows: int,
    out_dtype: torch.dtype,
    weight_TK: torch.Tensor | None = None,
    store_pre: bool = False,
    pre_RN: torch.Tensor | None = None,
    persistent: bool = False,
    tables: ChunkTables | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch _grouped_mm_kernel: `a` rows (gathered by token or in sorted order) times b_E[e]
    (E, KD, N) (any strides, so a transposed weight is a view). Returns (out, extra): extra is
    pre (EPI_SILU with store_pre) or the d(weight) partials (EPI_DSILU). `persistent`: on
    persistent_gemm's kernel where it serves (16-bit, TMA), else on this file's; `tables` the
    call's shared chunk tables (permutation.ChunkTables) for it."""
    E, KD, N = b_E.shape
    if a.shape[1] != KD:
        raise ValueError(f"inner dims differ: a {tuple(a.shape)} vs b_E {tuple(b_E.shape)}")
    perm = row_major(perm)
    if weight_TK is not None:
        weight_TK = weight_TK.contiguous()
    aligned = KD % 16 == 0 and N % 16 == 0
    rows = perm.sorted_pair_R.shape[0]
    # Where the persistent kernel does not run, the tile kernel serves, on its own tiles.
    persistent = persistent and runs_persistent(a.device)
    cfg = gemm_config(a.dtype, rows, E, aligned=aligned, epilogue=epilogue, persistent=persistent)
    dev = a.device
    out = torch.empty(out_rows, N, dtype=out_dtype, device=dev)
    num_n = triton.cdiv(N, cfg.block_n)
    extra = None
    pre = dw_part = out  # placeholders for pointers the epilogue does not touch
    if epilogue == EPI_SILU and store_pre:
        pre = extra = torch.empty_like(out)
    if epilogue == EPI_DSILU:
        pre = pre_RN.contiguous()  # read at the output's (row-major) offsets
        if pre.shape != out.shape:
            raise ValueError(f"pre must be {tuple(out.shape)}, got {tuple(pre.shape)}")
        dw_part = extra = torch.empty(out_rows, num_n, dtype=weight_TK.dtype, device=dev)
    weight = weight_TK if weight_TK is not None else out
    b_desc = persistent_gemm.weight_descriptor(b_E, cfg.block_k, cfg.block_n) if cfg.persistent else None
    # TMA reads a sorted-order A only when it is row-major with 16-byte aligned rows.
    a_tma = gather_a or (a.is_contiguous() and (KD * a.element_size()) % 16 == 0)
    if b_desc is not None and a_tma:
        persistent_gemm.launch(
            a,
            b_desc,
            out,
            pre,
            weight,
            dw_part,
            perm,
            top_k=top_k,
            gather_a=gather_a,
            epilogue=epilogue,
            store_pre=store_pre,
            scale=weight_TK is not None,
            cfg=cfg,
            tables=tables,
        )
        return out, extra
    if cfg.persistent:  # TMA cannot read an operand: the tile kernel, without the persistent config's extra stage
        cfg = gemm_config(a.dtype, rows, E, aligned=aligned, epilogue=epilogue)
    # Upper bound on M tiles: sum_e cdiv(c_e, BM) <= cdiv(R, BM) + E. Programs past the real
    # count exit at once; the bound comes from shapes, so nothing waits on the GPU.
    max_m_tiles = triton.cdiv(rows, cfg.block_m) + E
    _grouped_mm_kernel[(max_m_tiles * num_n,)](
        a,
        b_E,
        out,
        pre,
        weight,
        dw_part,
        perm.counts_E,
        perm.sorted_pair_R,
        N,
        KD,
        E,
        a.stride(0),
        a.stride(1),
        b_E.stride(0),
        b_E.stride(1),
        b_E.stride(2),
        out.stride(0),
        out.stride(1),
        TOP_K=top_k,
        GATHER_A=gather_a,
        EPILOGUE=epilogue,
        STORE_PRE=store_pre,
        SCALE=weight_TK is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_E=expert_block(E),
        ACC=acc_dtype(a.dtype),
        PRECISION=precision(a.dtype),
        UPCAST=upcast(a.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, extra


def combine(y_PN: torch.Tensor, pair_row_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(T, N) sums of each token's routed pair rows of y_PN (T*K, N)."""
    T, K = pair_row_TK.shape
    N = y_PN.shape[1]
    if y_PN.shape[0] != T * K:
        raise ValueError(f"y_PN must have T*K = {T * K} rows, got {tuple(y_PN.shape)}")
    pair_row_TK = pair_row_TK.contiguous()
    out = torch.empty(T, N, dtype=out_dtype, device=y_PN.device)
    block_t, block_n = (16, 32) if interpreter_requested() else (32, 128)
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(N, block_n))](
        y_PN,
        pair_row_TK,
        out,
        T,
        N,
        y_PN.stride(0),
        y_PN.stride(1),
        out.stride(0),
        out.stride(1),
        TOP_K=K,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        ACC=acc_dtype(y_PN.dtype),
        num_warps=4,
    )
    return out


def routing_weight_grad(dw_part_RJ: torch.Tensor, pair_row_TK: torch.Tensor) -> torch.Tensor:
    """d(routing weights) (T, K) from the per-row, per-N-tile partials of the down-dX GEMM."""
    T, K = pair_row_TK.shape
    num_parts = dw_part_RJ.shape[1]
    dw_part_RJ, pair_row_TK = dw_part_RJ.contiguous(), pair_row_TK.contiguous()  # read row-major
    dweight = torch.empty(T, K, dtype=dw_part_RJ.dtype, device=dw_part_RJ.device)
    block_p = 64
    _dweight_kernel[(triton.cdiv(T * K, block_p),)](
        dw_part_RJ,
        pair_row_TK,
        dweight,
        T * K,
        num_parts,
        BLOCK_P=block_p,
        BLOCK_J=max(2, triton.next_power_of_2(num_parts)),
        num_warps=4,
    )
    return dweight


class ExpertActivations(NamedTuple):
    """What the expert forward leaves for the backward (sorted rows, z's dtype): G * SiLU(pre)
    (dW2's left operand as is) and pre (the dSiLU epilogue recomputes SiLU from it)."""

    gact_RF: torch.Tensor
    pre_RF: torch.Tensor | None


def _row_gemms(perm: Permutation, top_k: int, dtype: torch.dtype, schedule: Schedule, tables: ChunkTables):
    """grouped_mm with what every row GEMM of one forward or backward shares: the permutation,
    R = T*K output rows in z's dtype, the schedule's kernel and the call's chunk tables."""
    R = perm.pair_row_TK.numel()
    persistent = schedule.gemm == "persistent"
    return functools.partial(
        grouped_mm, perm=perm, top_k=top_k, out_rows=R, out_dtype=dtype, persistent=persistent, tables=tables
    )


def experts_forward(
    z_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    perm: Permutation,
    *,
    save_pre: bool,
    schedule: Schedule = BUILTIN_SCHEDULE,
) -> tuple[torch.Tensor, ExpertActivations]:
    """h_TD = sum_s G_{t,s} E_{e(t,s)}(z_t) with the fused kernels above, on `schedule`'s GEMMs."""
    _check_expert_inputs(z_TD, w1_EDF, w2_EFD, topk_weight_TK, perm)
    perm, topk_weight_TK = row_major(perm), topk_weight_TK.contiguous()
    T, D = z_TD.shape
    K = perm.pair_row_TK.shape[1]
    R = T * K
    mm = _row_gemms(perm, K, z_TD.dtype, schedule, ChunkTables(perm.counts_E, R))
    gact, pre = mm(z_TD, w1_EDF, gather_a=True, epilogue=EPI_SILU, weight_TK=topk_weight_TK, store_pre=save_pre)
    y_PD, _ = mm(gact, w2_EFD, gather_a=False, epilogue=EPI_SCATTER)
    return combine(y_PD, perm.pair_row_TK, z_TD.dtype), ExpertActivations(gact, pre)


def experts_backward(
    dh_TD: torch.Tensor,
    z_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    perm: Permutation,
    saved: ExpertActivations,
    needs: tuple[bool, bool, bool, bool],
    schedule: Schedule = BUILTIN_SCHEDULE,
) -> tuple[torch.Tensor | None, ...]:
    """(dz_TD, dw1_EDF, dw2_EFD, d_topk_weight_TK); an entry is None where `needs` says so. Pass
    the forward's `schedule`."""
    if saved.pre_RF is None:
        raise ValueError("experts_forward ran with save_pre=False; there is no backward to run")
    need_z, need_w1, need_w2, need_weight = needs
    perm, topk_weight_TK = row_major(perm), topk_weight_TK.contiguous()
    T, D = z_TD.shape
    K = perm.pair_row_TK.shape[1]
    R = T * K
    dh_TD = dh_TD.to(z_TD.dtype).contiguous()
    tables = ChunkTables(perm.counts_E, R)  # one launch per chunk size for the four GEMMs below
    mm = _row_gemms(perm, K, z_TD.dtype, schedule, tables)
    # chunk None: wgrad.chunk_rows; R rows: one chunk per expert (no split)
    wgrad_args = dict(chunk=None if schedule.wgrad == "split" else R, tables=tables)
    # down-dX reads W2^T, up-dX W1^T: (E, N, F) and (E, F, D) views, no copies
    dpre, dw_part = mm(
        dh_TD,
        w2_EFD.transpose(1, 2),
        gather_a=True,
        epilogue=EPI_DSILU,
        weight_TK=topk_weight_TK,
        pre_RN=saved.pre_RF,
    )
    dz = dw1 = dw2 = dweight = None
    if need_weight:
        dweight = routing_weight_grad(dw_part, perm.pair_row_TK)
    if need_z:
        dz_PD, _ = mm(dpre, w1_EDF.transpose(1, 2), gather_a=False, epilogue=EPI_SCATTER)
        dz = combine(dz_PD, perm.pair_row_TK, z_TD.dtype)
    if need_w1:
        dw1 = grouped_wgrad(z_TD, dpre, perm, K, gather_x=True, gather_y=False, **wgrad_args, out_dtype=w1_EDF.dtype)
    if need_w2:
        dw2 = grouped_wgrad(
            saved.gact_RF, dh_TD, perm, K, gather_x=False, gather_y=True, **wgrad_args, out_dtype=w2_EFD.dtype
        )
    return dz, dw1, dw2, dweight
