"""Token permutation: expert offsets, the stable expert-sorted order of (token, slot) pairs, and
the tile schedule the grouped GEMMs walk.

Shape legend: T tokens, E experts, K experts per token, R = T*K pairs (pair id p = t*K + s),
NB token blocks of `router_block_t(E)` tokens (the router's blocking). Semantics:
reference.permute.

  _block_offsets_kernel  one program: expert offsets (exclusive prefix sum of the counts) and,
                         per token block, where its first pair of each expert goes (NB, E).
  _scatter_kernel        per token block: a pair's sorted row is its block's base for its expert
                         plus the number of earlier tokens of the block on that expert. Writes
                         sorted_pair (R,) and its inverse pair_row (T, K).
  tile_of                @triton.jit helper the GEMMs call: M-tile index -> (expert, rows).
  _chunk_table_kernel    one program: the weight gradients' row chunks (chunk_table), heaviest
                         expert first.

A token picks an expert at most once, so ordering an expert's pairs by pair id is ordering them by
token: the rank inside a block is a cumulative sum over the block's tokens. Every size comes from
shapes the host knows (no .item(), no host sync), so the whole path is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.platform import interpreter_requested
from moe_kernels.reference import Permutation
from moe_kernels.routing import expert_block, reduce_rows, router_block_t


@triton.jit
def tile_of(pid_m, counts_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map a GEMM program's M-tile index to (expert, first sorted row, expert's end row).

    Tiles are laid out expert after expert, cdiv(count_e, BLOCK_M) each. Deriving this from the
    counts inside each program (an E-wide cumsum) replaces a separate schedule kernel and lets any
    BLOCK_M share one permutation. expert == E means the tile is past the last one: no work.
    """
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, axis=0)
    rows_end = tl.cumsum(counts, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    is_e = offs_e == expert
    tile_begin = tl.sum(tl.where(is_e, tiles_end - tiles, 0), axis=0)
    row_begin = tl.sum(tl.where(is_e, rows_end - counts, 0), axis=0)
    row_end = tl.sum(tl.where(is_e, rows_end, 0), axis=0)
    return expert, row_begin + (pid_m - tile_begin) * BLOCK_M, row_end


@triton.jit
def _chunk_table_kernel(
    counts_ptr,
    table_ptr,
    expert_chunks_ptr,
    E,
    CHUNK,
    MAX_CHUNKS,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Split each expert's sorted rows into chunks of CHUNK rows (an expert with no rows gets one
    empty chunk, so its gradient is still written) and lay the chunks out expert after expert,
    the expert with the most rows first (ties: lower expert id first). Writes table (MAX_CHUNKS, 3)
    = (expert, first row, end row), expert = E past the last chunk, and expert_chunks (E, 2) =
    (index of the expert's first chunk, its number of chunks)."""
    offs_e = tl.arange(0, BLOCK_E)
    e_in = offs_e < E
    counts = tl.load(counts_ptr + offs_e, mask=e_in, other=0)
    row_begin = tl.cumsum(counts, axis=0) - counts
    chunks = tl.where(e_in, tl.maximum((counts + CHUNK - 1) // CHUNK, 1), 0)
    # (e, j): does expert j come before expert e? Then e's first chunk is the sum of those j's chunks.
    counts_j = tl.load(counts_ptr + offs_e[None, :], mask=e_in[None, :], other=-1)
    before = (counts_j > counts[:, None]) | ((counts_j == counts[:, None]) & (offs_e[None, :] < offs_e[:, None]))
    chunks_j = tl.where(e_in, tl.maximum((counts_j + CHUNK - 1) // CHUNK, 1), 0)
    first = tl.sum(tl.where(before, chunks_j, 0), axis=1)
    tl.store(expert_chunks_ptr + offs_e * 2, first, mask=e_in)
    tl.store(expert_chunks_ptr + offs_e * 2 + 1, chunks, mask=e_in)
    row_end = row_begin + counts
    for c0 in range(0, MAX_CHUNKS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        j = offs_c[:, None] - first[None, :]  # the chunk's index within expert e, if it is e's
        mine = (j >= 0) & (j < chunks[None, :])
        found = tl.sum(mine.to(tl.int32), axis=1) > 0
        expert = tl.where(found, tl.sum(tl.where(mine, offs_e[None, :], 0), axis=1), E)
        start = row_begin[None, :] + j * CHUNK
        lo = tl.sum(tl.where(mine, start, 0), axis=1)
        hi = tl.sum(tl.where(mine, tl.minimum(start + CHUNK, row_end[None, :]), 0), axis=1)
        c_in = offs_c < MAX_CHUNKS
        tl.store(table_ptr + offs_c * 3, expert, mask=c_in)
        tl.store(table_ptr + offs_c * 3 + 1, lo, mask=c_in)
        tl.store(table_ptr + offs_c * 3 + 2, hi, mask=c_in)


@triton.jit
def _block_offsets_kernel(
    blk_count_ptr,
    counts_ptr,
    offsets_ptr,
    block_base_ptr,
    NB,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_in = offs_e < E
    counts = tl.load(counts_ptr + offs_e, mask=e_in, other=0)
    ends = tl.cumsum(counts, axis=0)
    tl.store(offsets_ptr + offs_e, ends - counts, mask=e_in)
    tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    running = ends - counts  # next free sorted row of each expert
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        m = (offs_b < NB)[:, None] & e_in[None, :]
        offs = offs_b[:, None] * E + offs_e[None, :]
        c = tl.load(blk_count_ptr + offs, mask=m, other=0)
        tl.store(block_base_ptr + offs, running[None, :] + tl.cumsum(c, axis=0) - c, mask=m)
        running += tl.sum(c, axis=0)


@triton.jit
def _scatter_kernel(
    idx_ptr,
    block_base_ptr,
    sorted_pair_ptr,
    pair_row_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_in = offs_t < T
    offs_t64 = offs_t.to(tl.int64)
    onehot = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    for s in range(K):
        idx_s = tl.load(idx_ptr + offs_t64 * K + s, mask=t_in, other=-1)
        onehot += (offs_e[None, :] == idx_s[:, None]).to(tl.int32)
    base = tl.load(block_base_ptr + pid * E + offs_e, mask=offs_e < E, other=0)
    row_TE = base[None, :] + tl.cumsum(onehot, axis=0) - onehot  # sorted row if (t, e) is routed
    for s in range(K):
        idx_s = tl.load(idx_ptr + offs_t64 * K + s, mask=t_in, other=-1)
        row = tl.sum(tl.where(offs_e[None, :] == idx_s[:, None], row_TE, 0), axis=1)
        pair = offs_t64 * K + s
        routed = idx_s >= 0
        tl.store(sorted_pair_ptr + row, pair.to(tl.int32), mask=t_in & routed)
        tl.store(pair_row_ptr + pair, tl.where(routed, row, -1), mask=t_in)


def permute(topk_idx_TK: torch.Tensor, counts_E: torch.Tensor, blk_count_NE: torch.Tensor) -> Permutation:
    """Stable expert-sorted order of the pairs from the router's outputs (see module docstring).

    topk_idx_TK int32 (T, K) with -1 for masked tokens; counts_E int32 (E,) and blk_count_NE int32
    (NB, E) as written by routing.router_forward / balance_forward.
    """
    if topk_idx_TK.dim() != 2 or topk_idx_TK.dtype != torch.int32:
        raise ValueError(f"topk_idx_TK must be int32 (T, K), got {topk_idx_TK.dtype} {tuple(topk_idx_TK.shape)}")
    T, K = topk_idx_TK.shape
    E = counts_E.shape[0]
    nb = triton.cdiv(T, router_block_t(E))
    if counts_E.dtype != torch.int32 or blk_count_NE.dtype != torch.int32 or blk_count_NE.shape != (nb, E):
        raise ValueError(
            f"expected counts_E int32 ({E},) and blk_count_NE int32 ({nb}, {E}) for T={T}; got "
            f"{counts_E.dtype} {tuple(counts_E.shape)} and {blk_count_NE.dtype} {tuple(blk_count_NE.shape)}"
        )
    # The kernels index these row-major; strided views (e.g. idx[:, :K] of a wider tensor) are
    # copied once here (a no-op for the router's own outputs).
    topk_idx_TK, counts_E, blk_count_NE = (t.contiguous() for t in (topk_idx_TK, counts_E, blk_count_NE))
    dev = topk_idx_TK.device
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    block_base = torch.empty(nb, E, dtype=torch.int32, device=dev)
    sorted_pair = torch.empty(T * K, dtype=torch.int32, device=dev)
    pair_row = torch.empty(T, K, dtype=torch.int32, device=dev)
    block_e = expert_block(E)
    _block_offsets_kernel[(1,)](
        blk_count_NE, counts_E, offsets, block_base, nb, E, BLOCK_B=reduce_rows(E), BLOCK_E=block_e, num_warps=4
    )
    _scatter_kernel[(nb,)](
        topk_idx_TK,
        block_base,
        sorted_pair,
        pair_row,
        T,
        E,
        K=K,
        BLOCK_T=router_block_t(E),
        BLOCK_E=block_e,
        num_warps=4,
    )
    return Permutation(counts_E, offsets, sorted_pair, pair_row)


def max_chunks(num_pairs: int, num_experts: int, chunk: int) -> int:
    """Upper bound on chunk_table's chunks from shapes alone: sum_e max(1, cdiv(c_e, chunk)) <=
    cdiv(R, chunk) + E."""
    return triton.cdiv(num_pairs, chunk) + num_experts


def chunk_table(counts_E: torch.Tensor, num_pairs: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table (C, 3) int32, expert_chunks (E, 2) int32) of _chunk_table_kernel, C = max_chunks(...):
    the weight gradients' split-K schedule. num_pairs R bounds the counts' sum; nothing is read
    back to the host."""
    if counts_E.dim() != 1 or counts_E.dtype != torch.int32:
        raise ValueError(f"counts_E must be int32 (E,), got {counts_E.dtype} {tuple(counts_E.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 rows, got {chunk}")
    E = counts_E.shape[0]
    c = max_chunks(num_pairs, E, chunk)
    # (BLOCK_C, BLOCK_E) and (BLOCK_E, BLOCK_E) tiles in one program: at E = 128, 128 x 128 tiles
    # over 4 warps spilled 248 B on sm_90; 16 x 128 and 8 warps do not (Triton 3.9, 2026-12-02).
    block_e = expert_block(E)
    table = torch.empty(c, 3, dtype=torch.int32, device=counts_E.device)
    expert_chunks = torch.empty(E, 2, dtype=torch.int32, device=counts_E.device)
    _chunk_table_kernel[(1,)](
        counts_E.contiguous(),
        table,
        expert_chunks,
        E,
        chunk,
        c,
        BLOCK_E=block_e,
        BLOCK_C=32 if interpreter_requested() else max(16, 2048 // block_e),
        num_warps=8 if block_e >= 64 else 4,
    )
    return table, expert_chunks


class ChunkTables:
    """chunk_table(counts_E, num_pairs, chunk) for one permutation, each chunk size launched once:
    the row GEMMs of one forward (or one backward) share a BLOCK_M table, the two weight
    gradients their chunk's. Made per call by grouped_gemm.experts_forward/backward; the
    GEMM wrappers check that it belongs to their permutation's counts."""

    def __init__(self, counts_E: torch.Tensor, num_pairs: int) -> None:
        self.counts_E, self.num_pairs = counts_E, num_pairs
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, counts_E: torch.Tensor, num_pairs: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        if counts_E is not self.counts_E or num_pairs != self.num_pairs:
            raise ValueError("these chunk tables belong to another permutation")
        if chunk not in self._tables:
            self._tables[chunk] = chunk_table(counts_E, num_pairs, chunk)
        return self._tables[chunk]


def chunks_of(tables: ChunkTables | None, counts_E: torch.Tensor, num_pairs: int, chunk: int):
    """tables.get(...) where the caller shares tables, else a fresh chunk_table."""
    if tables is None:
        return chunk_table(counts_E, num_pairs, chunk)
    return tables.get(counts_E, num_pairs, chunk)
