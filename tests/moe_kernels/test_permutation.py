"""permutation.py kernels: exact agreement with reference.permute; a stable bijection that round-trips."""

import pytest
import torch

from moe_kernels import permutation, reference, routing


def _route(T, E, K, pattern, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if pattern == "skewed":
        logits[:, 0] += 50.0
    elif pattern == "empty":
        logits[:, E // 2 :] -= 50.0  # the upper half of the experts never wins while K <= E/2
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    r = routing.router_forward(logits, K, mask, "topk")
    counts, _, _ = routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, K)
    return r, counts


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "T,E,K,pattern",
    [
        (1, 1, 1, "uniform"),
        (1, 8, 8, "uniform"),
        (7, 3, 2, "uniform"),
        (64, 8, 2, "skewed"),
        (129, 8, 1, "uniform"),
        (129, 8, 8, "uniform"),
        (100, 8, 4, "empty"),
        (77, 128, 6, "uniform"),
        (257, 3, 1, "skewed"),
    ],
)
def test_permutation_matches_reference(T, E, K, pattern, masked):
    r, counts = _route(T, E, K, pattern, masked)
    perm = permutation.permute(r.topk_idx_TK, counts, r.blk_count_NE)
    ref = reference.permute(r.topk_idx_TK, E)
    n = int(ref.offsets_E1[-1])
    assert torch.equal(perm.offsets_E1, ref.offsets_E1)
    assert torch.equal(perm.sorted_pair_R[:n], ref.sorted_pair_R[:n])
    assert torch.equal(perm.pair_row_TK, ref.pair_row_TK)
    # A bijection between routed pairs and sorted rows [0, n), and it round-trips.
    valid = perm.pair_row_TK.reshape(-1) >= 0
    rows = perm.pair_row_TK.reshape(-1)[valid].long()
    assert torch.equal(torch.sort(rows).values, torch.arange(n))
    assert torch.equal(perm.sorted_pair_R[rows].long(), torch.arange(T * K)[valid])
    x = torch.randn(T * K, 3)
    assert torch.equal(x[perm.sorted_pair_R[:n].long()][rows], x[valid])
    if pattern == "empty" and K <= E // 2:
        assert (perm.counts_E[E // 2 :] == 0).all()


def test_input_checks():
    r, counts = _route(10, 4, 2, "uniform", False)
    with pytest.raises(ValueError, match="int32"):
        permutation.permute(r.topk_idx_TK.long(), counts, r.blk_count_NE)
    with pytest.raises(ValueError, match="blk_count_NE int32"):
        permutation.permute(r.topk_idx_TK, counts, r.blk_count_NE[:0])
