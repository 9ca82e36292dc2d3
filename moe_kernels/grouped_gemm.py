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
  dW1[e] = sum_{r in e} z[token(r)]^T dpre_r    one program per (expert, output tile) loops over
  dW2[e] = sum_{r in e} gact_r^T dh[token(r)]   the expert's rows in order: no atomics
The forward keeps G * act rather than act: dW2 is then a plain GEMM of two loaded tiles (scaling
Y by G in registers each step made its main loop wait on its own wgmma: benchmarks/inspect_sm90),
and the dSiLU epilogue reads pre alone (act = SiLU(pre) is recomputed).

Inputs bf16, fp16 or fp32 (fp64 for tests), accumulation in fp32 (fp64 for fp64). fp32 operands
use IEEE products unless torch allows TF32 for matmuls. Row indices are widened to int64 before
they meet a stride, so R*D and T*D may pass 2**31.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_kernels.backend import interpreter_requested
from moe_kernels.permutation import tile_of
from moe_kernels.reference import Permutation
from moe_kernels.routing import expert_block

# Epilogues of _grouped_mm_kernel.
EPI_SILU = 0  # store SiLU(acc) (times the routing weight if SCALE; and pre = acc) at sorted rows
EPI_SCATTER = 1  # store acc (times the routing weight if SCALE) at the pair's row
EPI_DSILU = 2  # backward through the routing weight and SiLU, plus d(weight) partials


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gemm_config(
    dtype: torch.dtype, rows: int, num_experts: int, *, aligned: bool, epilogue: int = EPI_SCATTER
) -> GemmConfig:
    """Tile shapes, fixed per dtype and shape class rather than autotuned: autotuning would let two
    processes pick different BLOCK_K, and so different summation orders, breaking bit-identical
    results across runs. Every config here was compiled for sm_90 with Triton 3.9's ptxas
    (benchmarks/inspect_sm90.py): no register spills; 16-bit GEMMs use wgmma and, when `aligned`
    (both GEMM widths multiples of 16, so loads vectorize), 128-bit cp.async in a 3-stage
    pipeline. Not yet timed on a GPU (none lent so far)."""
    if interpreter_requested():
        # 32x64x64: test shapes (D=100, F=72, ~90 rows per expert) still cross every tile, expert
        # and K-loop boundary, at a third of the interpreter time of 16x32x32 (measured on CPU).
        return GemmConfig(32, 64, 64, 4, 1)
    if dtype == torch.float64:
        return GemmConfig(32, 32, 16, 4, 2)
    if dtype == torch.float32:  # 64x64x32 at 4 warps spilled 376 B on sm_90; 8 warps do not
        return GemmConfig(128, 64, 32, 8, 3) if aligned else GemmConfig(64, 64, 32, 8, 3)
    if not aligned:  # scalar loads pipeline through registers: 64x128x64 spilled 1080 B
        return GemmConfig(64, 64, 32, 8, 3)
    # The dSiLU epilogue holds acc and pre tiles at once (act is recomputed from pre): at 128x128 it
    # still spills 40 B/thread (192 B when it also loaded act), at 128x64 it fits in 145 registers
    # (sm_90, Triton 3.9, 2026-12-02).
    block_n = 64 if epilogue == EPI_DSILU else 128
    if rows < 256 * num_experts:  # few rows per expert: halve M so fewer rows are padding
        return GemmConfig(64, block_n, 64, 4, 3)
    return GemmConfig(128, block_n, 64, 8, 3)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Dot bf16 tiles as fp32 in the interpreter only: its bf16 tl.dot multiplies raw bit patterns
    (Triton issue 11584; a bare bf16 kernel was off by ~1e10 here, the converted fp32 tiles exact).
    bf16 products are exact in fp32, so this equals the GPU's bf16 MMA with fp32 accumulation up
    to summation order. Compiled kernels never upcast."""
    return dtype == torch.bfloat16 and interpreter_requested()


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

    out_mask = m_in[:, None] & n_in[None, :]
    sorted_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if EPILOGUE == 0:  # EPI_SILU
        if STORE_PRE:
            tl.store(pre_ptr + sorted_offs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        act = acc * tl.sigmoid(acc)
        if SCALE:
            act = act * tl.load(weight_ptr + pair, mask=m_in, other=0.0).to(ACC)[:, None]
        tl.store(out_ptr + sorted_offs, act.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 1:  # EPI_SCATTER
        if SCALE:
            acc = acc * tl.load(weight_ptr + pair, mask=m_in, other=0.0).to(ACC)[:, None]
        pair_offs = pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptr + pair_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # EPI_DSILU: acc = dh[token] @ W2[e]^T, the gradient of the unweighted expert output
        pre = tl.load(pre_ptr + sorted_offs, mask=out_mask, other=0.0).to(ACC)
        sig = tl.sigmoid(pre)
        g_sig = acc * sig
        # dG_p = <dh_t, W2 SiLU(pre_r)> = sum g * pre * sig: this N tile's share, summed over tiles by
        # _dweight_kernel.
        tl.store(dw_part_ptr + offs_m.to(tl.int64) * num_n + pid_n, tl.sum(g_sig * pre, axis=1), mask=m_in)
        w = tl.load(weight_ptr + pair, mask=m_in, other=0.0).to(ACC)
        dpre = w[:, None] * g_sig * (1.0 + pre * (1.0 - sig))
        tl.store(out_ptr + sorted_offs, dpre.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr,
    y_ptr,
    dw_ptr,
    weight_ptr,
    counts_ptr,
    sorted_pair_ptr,
    P,
    Q,
    E,
    stride_xm,
    stride_xp,
    stride_ym,
    stride_yq,
    stride_we,
    stride_wp,
    stride_wq,
    TOP_K: tl.constexpr,
    GATHER_X: tl.constexpr,
    GATHER_Y: tl.constexpr,
    SCALE_Y: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dW[e] (P, Q) = sum over expert e's sorted rows r of X[r]^T Y[r] (optionally Y scaled by G)."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid // num_q
    pid_q = pid % num_q
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    row_begin = tl.sum(tl.where(offs_e < expert, counts, 0), axis=0)
    num_rows = tl.sum(tl.where(offs_e == expert, counts, 0), axis=0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_in = offs_p < P
    q_in = offs_q < Q
    offs_r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    # An expert with no rows skips the loop and stores zeros: its gradient is defined, never None.
    # The rows' pair ids are loaded one step ahead and carried into the next step, so the gathered
    # tile loads of a step depend on no load of the same step and the pipeliner can keep several
    # steps of copies in flight.
    pair_next = tl.load(sorted_pair_ptr + row_begin + offs_r, mask=offs_r < num_rows, other=0)
    for r0 in range(0, num_rows, BLOCK_K):
        r_in = offs_r < num_rows - r0
        rows = row_begin + r0 + offs_r
        pair = pair_next
        pair_next = tl.load(sorted_pair_ptr + rows + BLOCK_K, mask=offs_r < num_rows - r0 - BLOCK_K, other=0)
        tok = (pair // TOP_K).to(tl.int64)
        x_rows = tok if GATHER_X else rows.to(tl.int64)
        y_rows = tok if GATHER_Y else rows.to(tl.int64)
        x_t = tl.load(  # (BLOCK_P, BLOCK_K): X^T read in place
            x_ptr + x_rows[None, :] * stride_xm + offs_p[:, None] * stride_xp,
            mask=p_in[:, None] & r_in[None, :],
            other=0.0,
        )
        y = tl.load(
            y_ptr + y_rows[:, None] * stride_ym + offs_q[None, :] * stride_yq,
            mask=r_in[:, None] & q_in[None, :],
            other=0.0,
        )
        if SCALE_Y:
            w = tl.load(weight_ptr + pair, mask=r_in, other=0.0).to(ACC)
            y = (y.to(ACC) * w[:, None]).to(y_ptr.dtype.element_ty)
        if UPCAST:
            x_t, y = x_t.to(tl.float32), y.to(tl.float32)
        acc = tl.dot(x_t, y, acc, input_precision=PRECISION)
    tl.store(
        dw_ptr + expert.to(tl.int64) * stride_we + offs_p[:, None] * stride_wp + offs_q[None, :] * stride_wq,
        acc.to(dw_ptr.dtype.element_ty),
        mask=p_in[:, None] & q_in[None, :],
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


def _row_major(perm: Permutation) -> Permutation:
    """The permutation with every tensor contiguous: the kernels index them row-major. A no-op
    (no copy) for permute()'s own outputs; a strided view a user passes is copied once."""
    return Permutation(*(t.contiguous() for t in perm))


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch _grouped_mm_kernel: `a` rows (gathered by token or in sorted order) times b_E[e]
    (E, KD, N) (any strides, so a transposed weight is a view). Returns (out, extra): extra is
    pre (EPI_SILU with store_pre) or the d(weight) partials (EPI_DSILU)."""
    E, KD, N = b_E.shape
    if a.shape[1] != KD:
        raise ValueError(f"inner dims differ: a {tuple(a.shape)} vs b_E {tuple(b_E.shape)}")
    perm = _row_major(perm)
    if weight_TK is not None:
        weight_TK = weight_TK.contiguous()
    aligned = KD % 16 == 0 and N % 16 == 0
    cfg = gemm_config(a.dtype, perm.sorted_pair_R.shape[0], E, aligned=aligned, epilogue=epilogue)
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
    # Upper bound on M tiles: sum_e cdiv(c_e, BM) <= cdiv(R, BM) + E. Programs past the real
    # count exit at once; the bound comes from shapes, so nothing waits on the GPU.
    max_m_tiles = triton.cdiv(perm.sorted_pair_R.shape[0], cfg.block_m) + E
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
        ACC=_acc_dtype(a.dtype),
        PRECISION=_precision(a.dtype),
        UPCAST=_upcast(a.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, extra


def grouped_wgrad(
    x: torch.Tensor,
    y: torch.Tensor,
    perm: Permutation,
    top_k: int,
    *,
    gather_x: bool,
    gather_y: bool,
    out_dtype: torch.dtype,
    weight_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """dW (E, P, Q) with dW[e] = sum over expert e's rows of x_row^T y_row (y scaled by G if given)."""
    E = perm.counts_E.shape[0]
    P, Q = x.shape[1], y.shape[1]
    perm = _row_major(perm)
    if weight_TK is not None:
        weight_TK = weight_TK.contiguous()
    cfg = gemm_config(x.dtype, perm.sorted_pair_R.shape[0], E, aligned=P % 16 == 0 and Q % 16 == 0)
    dw = torch.empty(E, P, Q, dtype=out_dtype, device=x.device)
    block_p = block_q = cfg.block_n
    grid = (triton.cdiv(P, block_p) * triton.cdiv(Q, block_q), E)
    _grouped_wgrad_kernel[grid](
        x,
        y,
        dw,
        weight_TK if weight_TK is not None else y,
        perm.counts_E,
        perm.sorted_pair_R,
        P,
        Q,
        E,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        TOP_K=top_k,
        GATHER_X=gather_x,
        GATHER_Y=gather_y,
        SCALE_Y=weight_TK is not None,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_K=cfg.block_k,
        BLOCK_E=expert_block(E),
        ACC=_acc_dtype(x.dtype),
        PRECISION=_precision(x.dtype),
        UPCAST=_upcast(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dw


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
        ACC=_acc_dtype(y_PN.dtype),
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


def experts_forward(
    z_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    perm: Permutation,
    *,
    save_pre: bool,
) -> tuple[torch.Tensor, ExpertActivations]:
    """h_TD = sum_s G_{t,s} E_{e(t,s)}(z_t) with the fused kernels above."""
    _check_expert_inputs(z_TD, w1_EDF, w2_EFD, topk_weight_TK, perm)
    perm, topk_weight_TK = _row_major(perm), topk_weight_TK.contiguous()
    T, D = z_TD.shape
    K = perm.pair_row_TK.shape[1]
    R = T * K
    gact, pre = grouped_mm(
        z_TD,
        w1_EDF,
        perm,
        K,
        gather_a=True,
        epilogue=EPI_SILU,
        out_rows=R,
        out_dtype=z_TD.dtype,
        weight_TK=topk_weight_TK,
        store_pre=save_pre,
    )
    y_PD, _ = grouped_mm(gact, w2_EFD, perm, K, gather_a=False, epilogue=EPI_SCATTER, out_rows=R, out_dtype=z_TD.dtype)
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
) -> tuple[torch.Tensor | None, ...]:
    """(dz_TD, dw1_EDF, dw2_EFD, d_topk_weight_TK); an entry is None where `needs` says so."""
    if saved.pre_RF is None:
        raise ValueError("experts_forward ran with save_pre=False; there is no backward to run")
    need_z, need_w1, need_w2, need_weight = needs
    perm, topk_weight_TK = _row_major(perm), topk_weight_TK.contiguous()
    T, D = z_TD.shape
    K = perm.pair_row_TK.shape[1]
    R = T * K
    dh_TD = dh_TD.to(z_TD.dtype).contiguous()
    w2_t = w2_EFD.transpose(1, 2)  # (E, D, F) view: the down projection's dX reads W2^T
    dpre, dw_part = grouped_mm(
        dh_TD,
        w2_t,
        perm,
        K,
        gather_a=True,
        epilogue=EPI_DSILU,
        out_rows=R,
        out_dtype=z_TD.dtype,
        weight_TK=topk_weight_TK,
        pre_RN=saved.pre_RF,
    )
    dz = dw1 = dw2 = dweight = None
    if need_weight:
        dweight = routing_weight_grad(dw_part, perm.pair_row_TK)
    if need_z:
        dz_PD, _ = grouped_mm(
            dpre,
            w1_EDF.transpose(1, 2),
            perm,
            K,
            gather_a=False,
            epilogue=EPI_SCATTER,
            out_rows=R,
            out_dtype=z_TD.dtype,
        )
        dz = combine(dz_PD, perm.pair_row_TK, z_TD.dtype)
    if need_w1:
        dw1 = grouped_wgrad(z_TD, dpre, perm, K, gather_x=True, gather_y=False, out_dtype=w1_EDF.dtype)
    if need_w2:
        dw2 = grouped_wgrad(saved.gact_RF, dh_TD, perm, K, gather_x=False, gather_y=True, out_dtype=w2_EFD.dtype)
    return dz, dw1, dw2, dweight
