"""wgrad.py and permutation.chunk_table: split-K weight gradients against a float64 einsum per
expert, over chunk sizes (one row, odd, one K-step, the default, no split) and routing extremes;
split-K results bit-identical across reruns."""

import pytest
import torch

from moe_kernels import permutation, wgrad
from tests.moe_kernels.test_grouped_gemm import _problem as grouped_problem
from tests.utils import assert_close, max_rel_error


def _chunks_expected(counts: list[int], chunk: int, max_chunks: int):
    """The schedule chunk_table must write, built one expert at a time in Python."""
    E = len(counts)
    begin = [sum(counts[:e]) for e in range(E)]
    order = sorted(range(E), key=lambda e: (-counts[e], e))  # heaviest first, ties by id
    table, expert_chunks = [], [None] * E
    for e in order:
        n = max(1, -(-counts[e] // chunk))
        expert_chunks[e] = (len(table), n)
        for j in range(n):
            lo = begin[e] + j * chunk
            table.append((e, lo, min(lo + chunk, begin[e] + counts[e])))
    table += [(E, 0, 0)] * (max_chunks - len(table))
    return table, expert_chunks


@pytest.mark.parametrize(
    "counts,chunk",
    [
        ([5], 1),
        ([0, 0, 7], 3),
        ([4, 9, 0, 9, 1], 4),  # a tie (9, 9), an empty expert
        ([64, 0, 65, 128, 3, 3, 0, 1], 64),
        ([200] + [0] * 12, 64),  # every row on one expert; E = 13 (not a power of two)
        ([3, 1, 2], 1000),  # one chunk each: no split
    ],
)
def test_chunk_table_heaviest_expert_first(counts, chunk):
    counts_E = torch.tensor(counts, dtype=torch.int32)
    table, expert_chunks = permutation.chunk_table(counts_E, sum(counts), chunk)
    assert table.shape[0] == permutation.max_chunks(sum(counts), len(counts), chunk)
    want_table, want_ec = _chunks_expected(counts, chunk, table.shape[0])
    real = sum(n for _, n in want_ec)
    assert table[:real].tolist() == [list(r) for r in want_table[:real]]
    assert (table[real:, 0] == len(counts)).all(), "entries past the last chunk must say 'no expert'"
    assert expert_chunks.tolist() == [list(r) for r in want_ec]


def test_chunk_tables_launch_once_per_size_and_belong_to_one_permutation():
    counts_E = torch.tensor([5, 0, 9], dtype=torch.int32)
    tables = permutation.ChunkTables(counts_E, 14)
    first = tables.get(counts_E, 14, 4)
    assert tables.get(counts_E, 14, 4) is first  # shared, not launched again
    want = permutation.chunk_table(counts_E, 14, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, want, strict=True))  # a rerun of the same call
    assert tables.get(counts_E, 14, 7) is not first
    with pytest.raises(ValueError, match="another permutation"):
        tables.get(counts_E.clone(), 14, 4)
    with pytest.raises(ValueError, match="another permutation"):
        tables.get(counts_E, 15, 4)


def test_chunk_table_rejects_bad_input():
    with pytest.raises(ValueError, match="int32"):
        permutation.chunk_table(torch.tensor([1, 2]), 3, 1)
    with pytest.raises(ValueError, match="got 0"):
        permutation.chunk_table(torch.tensor([1, 2], dtype=torch.int32), 3, 0)


def _problem(T, P, Q, E, K, routing):
    """Routing and x (T, P) from test_grouped_gemm's problem; y (R, Q) in sorted order."""
    x_TP, _, _, _, perm, _ = grouped_problem(T, P, 8, E, K, routing, masked=False)
    y_RQ = torch.randn(T * K, Q, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return perm, x_TP, y_RQ


def _expected(perm, x_TP, y_RQ, K):
    """dW[e] = sum over e's sorted rows r of x[token(r)]^T y[r], in float64."""
    E = perm.counts_E.shape[0]
    tok = perm.sorted_pair_R.long() // K
    out = torch.zeros(E, x_TP.shape[1], y_RQ.shape[1], dtype=torch.float64)
    for e in range(E):
        rows = torch.arange(int(perm.offsets_E1[e]), int(perm.offsets_E1[e + 1]))
        out[e] = x_TP[tok[rows]].double().T @ y_RQ[rows].double()
    return out


CASES = [  # T, P, Q, E, K, routing
    (1, 40, 24, 1, 1, "uniform"),
    (7, 24, 40, 8, 8, "uniform"),  # k = E
    (129, 40, 72, 4, 2, "skewed"),
    (90, 72, 40, 8, 2, "empty"),
]


@pytest.mark.parametrize("chunk", [1, 7, 64, None, 10**6])
@pytest.mark.parametrize("T,P,Q,E,K,routing", CASES)
def test_fp32_matches_float64(T, P, Q, E, K, routing, chunk):
    perm, x, y = _problem(T, P, Q, E, K, routing)
    want = _expected(perm, x, y, K)
    got = wgrad.grouped_wgrad(
        x.float(), y.float(), perm, K, gather_x=True, gather_y=False, out_dtype=torch.float32, chunk=chunk
    )
    assert got.dtype == torch.float32
    assert max_rel_error(got, want) <= 1e-5, f"chunk {chunk}: {max_rel_error(got, want):.3g}"
    assert (got[perm.counts_E == 0] == 0).all(), "experts without rows get zero gradients"


@pytest.mark.parametrize("chunk", [5, None])
def test_fp16_and_gathered_y(chunk):
    """dW2's form (x in sorted order, y gathered by token) in fp16 from strided views: fp16 rounds
    each input to 11 bits, so the comparison is against the float64 sum of the rounded inputs with
    the fp32 accumulator's slack (the output is stored in fp16: 2**-11 relative)."""
    T, P, Q, E, K = 70, 40, 24, 4, 2
    perm, _, _ = _problem(T, P, Q, E, K, "uniform")
    g = torch.Generator().manual_seed(1)
    x_RP = torch.randn(P, T * K, generator=g).half().T  # a transposed view: strides (1, R)
    y_TQ = torch.randn(T, 2 * Q, generator=g).half()[:, ::2]  # every other column
    got = wgrad.grouped_wgrad(x_RP, y_TQ, perm, K, gather_x=False, gather_y=True, out_dtype=torch.float16, chunk=chunk)
    tok = perm.sorted_pair_R.long() // K
    want = torch.stack(
        [
            x_RP[int(perm.offsets_E1[e]) : int(perm.offsets_E1[e + 1])].double().T
            @ y_TQ[tok[int(perm.offsets_E1[e]) : int(perm.offsets_E1[e + 1])]].double()
            for e in range(E)
        ]
    )
    assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item(), name=f"dW chunk {chunk}")


def test_split_reruns_bit_identical_and_close_to_no_split():
    """The same call twice gives the same bits (fixed reduction order); a different chunking sums
    in another order, so it is compared with fp32 round-off over ~T/E = 30 terms of size ~1."""
    perm, x, y = _problem(129, 40, 72, 4, 2, "skewed")
    x, y = x.float(), y.float()
    call = lambda c: wgrad.grouped_wgrad(x, y, perm, 2, gather_x=True, gather_y=False, out_dtype=torch.float32, chunk=c)  # noqa: E731
    first, again = call(7), call(7)
    assert torch.equal(first, again)
    assert_close(call(10**6), first, rtol=1e-5, atol=1e-4, name="split vs no split")


def test_wgrad_input_checks():
    perm, x, y = _problem(7, 24, 40, 2, 1, "uniform")
    with pytest.raises(ValueError, match="dtypes differ"):
        wgrad.grouped_wgrad(x.float(), y.half(), perm, 1, gather_x=True, gather_y=False, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk must be >= 1 rows, got 0"):
        wgrad.grouped_wgrad(x, y, perm, 1, gather_x=True, gather_y=False, out_dtype=torch.float64, chunk=0)


def test_chunk_rows_balances_programs():
    """Compiled (not interpreted) sizing, from shapes: many tiles -> about one chunk per expert's
    mean count; few tiles -> more splits, capped; never under MIN_CHUNK_STEPS K-steps."""
    rows = wgrad._split_rows
    assert rows(65536, 8, 200, 64, 132) == 8192  # the paper's dW1 at T = 16k: split only the heavy experts
    assert rows(65536, 8, 2, 64, 132) == 65536 // (8 * wgrad.MAX_SPLITS)  # 16 splits cap it
    assert rows(1024, 8, 2, 64, 132) == wgrad.MIN_CHUNK_STEPS * 64
