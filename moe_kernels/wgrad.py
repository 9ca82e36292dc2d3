"""Grouped weight gradients, split over rows (split-K) and reduced in a fixed order.

Shape legend: R = T*K pairs in expert-sorted rows (permutation.py), E experts, P x Q one expert's
weight (D x F for dW1, F x N for dW2), C chunks. Semantics: dW[e] = sum over expert e's rows r of
x_r^T y_r (reference.expert_mlp's weight gradients):

    dW1[e] = sum_{r in e} z[token(r)]^T dpre_r      x gathered by token, y in sorted order
    dW2[e] = sum_{r in e} gact_r^T dh[token(r)]     x in sorted order, y gathered by token

Schedule: permutation.chunk_table cuts every expert's rows into chunks of `chunk` rows, heaviest
expert first. One program per (P x Q tile, chunk) sums its chunk's rows; an expert whose rows fit
one chunk stores dW[e] directly, any other stores an fp32 partial that _reduce_kernel then adds up
chunk after chunk (expert order, then row order): no atomics, so the same routing gives the same
bits on every run. Without the split one program per (tile, expert) walks all of an expert's rows
and the heaviest expert sets the tail; with it, programs are the same size up to each expert's
last chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.gemm_config import acc_dtype, gemm_config, precision, row_major, sm_count, upcast
from moe_kernels.permutation import ChunkTables, chunks_of
from moe_kernels.platform import interpreter_requested
from moe_kernels.reference import Permutation

# Chunk size: enough programs for WAVES full waves over the GPU's SMs, each chunk at least
# MIN_CHUNK_STEPS K-steps long so the 3-stage copy pipeline reaches its steady state before the
# partial is written, and never more than MAX_SPLITS chunks per expert on average (the fp32
# partials take C x P x Q x 4 bytes: 16 chunks of the paper's dW1, 2560 x 1280, are 210 MB).
WAVES = 2
MIN_CHUNK_STEPS = 4
MAX_SPLITS = 16


@triton.jit
def _wgrad_kernel(
    x_ptr,
    y_ptr,
    dw_ptr,
    part_ptr,
    table_ptr,
    expert_chunks_ptr,
    sorted_pair_ptr,
    P,
    Q,
    E,
    stride_xm,
    stride_xp,
    stride_ym,
    stride_yq,
    TOP_K: tl.constexpr,
    GATHER_X: tl.constexpr,
    GATHER_Y: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One (BLOCK_P x BLOCK_Q tile, chunk): sum over the chunk's rows r of X[r]^T Y[r], stored in
    dW[e] (dW's dtype) when the chunk is its expert's only one, else in part[chunk] (ACC)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    expert = tl.load(table_ptr + chunk * 3)
    if expert >= E:  # past the last chunk: the grid is sized from shapes, not from the counts
        return
    row_begin = tl.load(table_ptr + chunk * 3 + 1)
    num_rows = tl.load(table_ptr + chunk * 3 + 2) - row_begin
    num_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (pid // num_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % num_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_in = offs_p < P
    q_in = offs_q < Q
    offs_r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    # The rows' pair ids are loaded one step ahead and carried into the next step, so the gathered
    # tile loads of a step depend on no load of the same step and the pipeliner can keep several
    # steps of copies in flight. An empty chunk (an expert without rows) skips the loop and
    # stores zeros: the gradient is defined, never None.
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
        if UPCAST:
            x_t, y = x_t.to(tl.float32), y.to(tl.float32)
        acc = tl.dot(x_t, y, acc, input_precision=PRECISION)
    # dW and part are contiguous (the wrapper allocates them): row-major (P, Q) per expert / chunk.
    tile = offs_p.to(tl.int64)[:, None] * Q + offs_q[None, :]
    mask = p_in[:, None] & q_in[None, :]
    if tl.load(expert_chunks_ptr + expert * 2 + 1) == 1:
        tl.store(dw_ptr + expert.to(tl.int64) * P * Q + tile, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + chunk.to(tl.int64) * P * Q + tile, acc, mask=mask)


@triton.jit
def _reduce_kernel(part_ptr, dw_ptr, expert_chunks_ptr, PQ, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dW[e] = sum of expert e's chunk partials, chunk after chunk (skipped when e has one chunk:
    _wgrad_kernel stored it)."""
    expert = tl.program_id(1)
    first = tl.load(expert_chunks_ptr + expert * 2)
    n = tl.load(expert_chunks_ptr + expert * 2 + 1)
    if n == 1:
        return
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PQ
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for j in range(0, n):
        acc += tl.load(part_ptr + (first + j).to(tl.int64) * PQ + offs, mask=m, other=0.0)
    tl.store(dw_ptr + expert.to(tl.int64) * PQ + offs, acc.to(dw_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- host wrappers


def _split_rows(num_pairs: int, num_experts: int, num_tiles: int, block_k: int, sms: int) -> int:
    """Rows per chunk for R pairs over E experts with num_tiles (P x Q) tiles per expert: enough
    chunks for WAVES waves over `sms` SMs, at most MAX_SPLITS per expert on average, and never
    under MIN_CHUNK_STEPS K-steps. With many tiles this is the mean rows per expert, so only the
    experts heavier than the mean are split (the ones that set the tail)."""
    splits = min(MAX_SPLITS, max(1, -(-WAVES * sms // (num_tiles * num_experts))))
    rows = triton.cdiv(triton.cdiv(num_pairs, num_experts * splits), block_k) * block_k
    return max(rows, MIN_CHUNK_STEPS * block_k)


def chunk_rows(num_pairs: int, num_experts: int, num_tiles: int, block_k: int, device: torch.device) -> int:
    """_split_rows for the device's SM count; in the interpreter one K-step, so the tests' ~90
    rows per expert cross chunk boundaries."""
    if interpreter_requested():
        return block_k
    return _split_rows(num_pairs, num_experts, num_tiles, block_k, sm_count(device))


def grouped_wgrad(
    x: torch.Tensor,
    y: torch.Tensor,
    perm: Permutation,
    top_k: int,
    *,
    gather_x: bool,
    gather_y: bool,
    out_dtype: torch.dtype,
    chunk: int | None = None,
    tables: ChunkTables | None = None,
) -> torch.Tensor:
    """dW (E, P, Q) with dW[e] = sum over expert e's sorted rows of x_row^T y_row; x rows (and
    likewise y's) are gathered by token (gather_x) or read in sorted order. `chunk` rows per
    split (default: chunk_rows); a chunk of at least R rows is no split (no partials, no reduce).
    `tables`: chunk tables shared with the other weight gradient of the same backward."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise ValueError(f"x and y dtypes differ: {x.dtype}, {y.dtype}")
    E = perm.counts_E.shape[0]
    R = perm.sorted_pair_R.shape[0]
    P, Q = x.shape[1], y.shape[1]
    perm = row_major(perm)
    cfg = gemm_config(x.dtype, R, E, aligned=P % 16 == 0 and Q % 16 == 0)
    block_p = block_q = cfg.block_n
    num_tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    if chunk is None:
        chunk = chunk_rows(R, E, num_tiles, cfg.block_k, x.device)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 rows, got {chunk}")
    chunk = min(chunk, max(R, 1))
    table, expert_chunks = chunks_of(tables, perm.counts_E, R, chunk)
    split = chunk < R  # some expert may span several chunks
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dw = torch.empty(E, P, Q, dtype=out_dtype, device=x.device)
    # fp32 partials only when some expert may span chunks; else a placeholder the kernel never writes
    part = torch.empty((table.shape[0], P, Q) if split else (1,), dtype=acc, device=x.device)
    _wgrad_kernel[(num_tiles, table.shape[0])](
        x,
        y,
        dw,
        part,
        table,
        expert_chunks,
        perm.sorted_pair_R,
        P,
        Q,
        E,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        TOP_K=top_k,
        GATHER_X=gather_x,
        GATHER_Y=gather_y,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_K=cfg.block_k,
        ACC=acc_dtype(x.dtype),
        PRECISION=precision(x.dtype),
        UPCAST=upcast(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        block = 1024
        _reduce_kernel[(triton.cdiv(P * Q, block), E)](
            part, dw, expert_chunks, P * Q, BLOCK=block, ACC=acc_dtype(x.dtype), num_warps=4
        )
    return dw
