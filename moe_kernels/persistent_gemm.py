"""Persistent grouped row GEMM: one program per SM walks the (M tile, N tile) pairs, with TMA
loads for every operand that is not gathered.

Shape legend as grouped_gemm.py: R = T*K pairs in expert-sorted rows, KD the inner width, N the
output width, E experts; W (E, KD, N) or its transposed view. Same semantics and epilogues as
grouped_gemm._grouped_mm_kernel (epilogues.store_epilogue), different schedule:

  - The M tiles come from permutation.chunk_table with BLOCK_M-row chunks: (expert, first row,
    end row) read from a table, heaviest expert first, instead of an E-wide scan per program.
  - Weights are read through 3-D TMA descriptors (E, KD, N) with (1, BLOCK_K, BLOCK_N) boxes (a
    transposed weight, as the backward's W^T, through a descriptor of its storage and a
    transpose in shared memory); TMA zero-fills past KD and N, so their loads have no masks, and
    gathered A rows drop the column mask where KD is a multiple of BLOCK_K (EVEN_K).
  - A rows in sorted order (the down GEMM's G*act, the backward's dpre) are TMA boxes too: rows
    past the expert's end belong to the next expert but only reach output rows that are masked
    at the store. A rows gathered by token (z, dh) stay pointer loads.
  - The tile loop is flattened with the K loop (tl.range(flatten=True)), so the pipeliner can
    issue the next tile's first copies while this tile's epilogue runs.

The host wrapper (grouped_gemm.grouped_mm) picks this kernel where gemm_config says so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_kernels.epilogues import store_epilogue
from moe_kernels.gemm_config import GemmConfig, acc_dtype, precision, sm_count, upcast
from moe_kernels.permutation import ChunkTables, chunks_of
from moe_kernels.reference import Permutation
from moe_kernels.routing import expert_block


@triton.jit
def _persistent_mm_kernel(
    a_ptr,
    a_desc,
    b_desc,
    out_ptr,
    pre_ptr,
    weight_ptr,
    dw_part_ptr,
    table_ptr,
    expert_chunks_ptr,
    sorted_pair_ptr,
    N,
    KD,
    E,
    num_progs,
    stride_am,
    stride_ak,
    stride_om,
    stride_on,
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    B_TRANS: tl.constexpr,
    EVEN_K: tl.constexpr,
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
    """Tiles pid, pid + num_progs, ... of the (M tile, N tile) grid, N fastest."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    num_m = tl.sum(tl.load(expert_chunks_ptr + offs_e * 2 + 1, mask=offs_e < E, other=0), axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_m * num_n, num_progs, flatten=True):
        pid_m = tile // num_n
        pid_n = tile % num_n
        expert = tl.load(table_ptr + pid_m * 3)
        first_row = tl.load(table_ptr + pid_m * 3 + 1)
        offs_m = first_row + tl.arange(0, BLOCK_M)
        m_in = offs_m < tl.load(table_ptr + pid_m * 3 + 2)
        pair = tl.load(sorted_pair_ptr + offs_m, mask=m_in, other=0)
        a_rows = (pair // TOP_K).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, KD, BLOCK_K):
            if GATHER_A:
                a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak
                if EVEN_K:  # KD a multiple of BLOCK_K: no column mask on any step
                    a = tl.load(a_ptrs, mask=m_in[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=m_in[:, None] & (k0 + offs_k < KD)[None, :], other=0.0)
            else:
                a = a_desc.load([first_row, k0])
            if B_TRANS:
                b = tl.trans(b_desc.load([expert, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
            else:
                b = b_desc.load([expert, k0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        store_epilogue(
            acc,
            offs_m,
            m_in,
            offs_n,
            offs_n < N,
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


def weight_descriptor(b_E: torch.Tensor, block_k: int, block_n: int) -> tuple[TensorDescriptor, bool] | None:
    """(descriptor, transposed) for b_E (E, KD, N) read in (1, BLOCK_K, BLOCK_N) boxes, or None
    where TMA cannot read it: b_E row-major, or the transpose of a row-major (E, N, KD), with
    16-byte aligned rows (TMA's rule for every stride but the last)."""
    size = b_E.element_size()
    if b_E.is_contiguous() and (b_E.shape[2] * size) % 16 == 0:
        return TensorDescriptor.from_tensor(b_E, [1, block_k, block_n]), False
    storage = b_E.transpose(1, 2)
    if storage.is_contiguous() and (storage.shape[2] * size) % 16 == 0:
        return TensorDescriptor.from_tensor(storage, [1, block_n, block_k]), True
    return None


def launch(
    a: torch.Tensor,
    b_desc: tuple[TensorDescriptor, bool],
    out: torch.Tensor,
    pre: torch.Tensor,
    weight: torch.Tensor,
    dw_part: torch.Tensor,
    perm: Permutation,
    *,
    top_k: int,
    gather_a: bool,
    epilogue: int,
    store_pre: bool,
    scale: bool,
    cfg: GemmConfig,
    tables: ChunkTables | None = None,
) -> None:
    """Launch _persistent_mm_kernel over min(SMs, tiles) programs, its M tiles from
    chunk_table(counts, R, BLOCK_M). The caller (grouped_gemm.grouped_mm) has checked shapes and
    made the outputs (N = out's width); the dtype rules come from gemm_config. `tables`: the
    call's shared chunk tables (one launch for the row GEMMs of a forward or a backward)."""
    E = perm.counts_E.shape[0]
    n, kd = out.shape[1], a.shape[1]
    table, expert_chunks = chunks_of(tables, perm.counts_E, perm.sorted_pair_R.shape[0], cfg.block_m)
    num_tiles = table.shape[0] * triton.cdiv(n, cfg.block_n)  # upper bound: the kernel reads the real count
    num_progs = max(1, min(sm_count(a.device), num_tiles))
    a_desc = a if gather_a else TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    desc, trans = b_desc
    _persistent_mm_kernel[(num_progs,)](
        a,
        a_desc,
        desc,
        out,
        pre,
        weight,
        dw_part,
        table,
        expert_chunks,
        perm.sorted_pair_R,
        n,
        kd,
        E,
        num_progs,
        a.stride(0),
        a.stride(1),
        out.stride(0),
        out.stride(1),
        TOP_K=top_k,
        GATHER_A=gather_a,
        B_TRANS=trans,
        EVEN_K=kd % cfg.block_k == 0,
        EPILOGUE=epilogue,
        STORE_PRE=store_pre,
        SCALE=scale,
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
