"""reference.py against a per-token loop (tests/utils.naive_moe_ffn) in float64."""

import pytest
import torch

from moe_kernels import reference
from tests.utils import assert_close, make_moe_inputs, naive_moe_ffn, naive_topk

CASES = [  # T, D, F, E, K, routing
    (1, 5, 3, 4, 2, "uniform"),
    (7, 6, 5, 3, 1, "uniform"),
    (13, 8, 4, 5, 5, "uniform"),  # k = E
    (20, 4, 6, 8, 3, "empty"),
    (9, 7, 3, 4, 1, "one"),  # every token on expert 0
    (11, 6, 5, 4, 2, "one"),
    (10, 5, 4, 6, 2, "ties"),
]


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, aux = outputs
    loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum() + 0.7 * aux
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("balance_p", ["topk", "softmax"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T,D,F,E,K,routing", CASES)
def test_moe_ffn_matches_per_token_loop(T, D, F, E, K, routing, masked, balance_p):
    inputs = make_moe_inputs(T, D, F, E, routing=routing)
    mask = None
    if masked:
        mask = torch.rand(T, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[0] = True
    out = reference.reference_moe_ffn(*inputs, K, mask, balance_p)
    h_ref, aux_ref, counts_ref = naive_moe_ffn(*inputs, K, mask, balance_p)
    assert_close(out.h_TD, h_ref, rtol=1e-12, atol=1e-12, name="h")
    assert_close(out.aux_loss, aux_ref, rtol=1e-12, atol=1e-12, name="aux")
    assert torch.equal(out.counts_E, counts_ref)
    got = _grads((out.h_TD, out.aux_loss), inputs)
    want = _grads((h_ref, aux_ref), inputs)
    for name, a, b in zip(("dz", "drouter", "dw1", "dw2"), got, want, strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-12, name=name)


def test_topk_ties_go_to_lower_index_and_nan_never_wins():
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0],
            [0.0, 0.0, 0.0, 0.0],
            [float("nan"), 1.0, 1.0, -1.0],
            [float("-inf"), float("-inf"), 2.0, float("-inf")],
        ]
    )
    idx, w = reference.topk_route(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1], [1, 2], [2, 0]]
    assert [naive_topk(row, 2) for row in logits] == idx.tolist()
    assert_close(w[0], torch.tensor([0.5, 0.5]), atol=1e-7)
    assert_close(w[1], torch.tensor([0.5, 0.5]), atol=1e-7)
    assert_close(w[2], torch.tensor([0.5, 0.5]), atol=1e-7)  # the NaN is not kept
    assert_close(w[3], torch.tensor([1.0, 0.0]), atol=1e-7)
    _, w_nan = reference.topk_route(torch.full((1, 4), float("nan")), 2)
    assert torch.isnan(w_nan).all()  # kept NaNs poison the weights


def test_permutation_is_a_stable_bijection():
    g = torch.Generator().manual_seed(0)
    T, K, E = 37, 3, 6
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    idx[5] = -1  # a masked token
    perm = reference.permute(idx, E)
    n = int(perm.offsets_E1[-1])
    assert n == (T - 1) * K == int(perm.counts_E.sum())
    rows = perm.sorted_pair_R[:n].long()
    assert sorted(rows.tolist()) == sorted(p for p in range(T * K) if p // K != 5)
    experts = idx.reshape(-1)[rows]
    assert torch.all(experts[1:] >= experts[:-1])  # sorted by expert
    for e in range(E):  # stable: token order inside an expert
        seg = rows[perm.offsets_E1[e] : perm.offsets_E1[e + 1]]
        assert torch.all(seg[1:] > seg[:-1])
    # pair_row inverts sorted_pair
    valid = perm.pair_row_TK.reshape(-1) >= 0
    assert torch.equal(
        perm.sorted_pair_R[perm.pair_row_TK.reshape(-1)[valid].long()].long(), torch.arange(T * K)[valid]
    )
    assert (perm.pair_row_TK[5] == -1).all()


@pytest.mark.parametrize("K", [1, 2, 4])
def test_balance_loss_is_k_when_perfectly_balanced(K):
    E, T = 4, 8
    # Token t prefers experts t, t+1, ... (mod E) with equal logits: loads and importances are uniform.
    logits = torch.full((T, E), -10.0)
    for t in range(T):
        for j in range(K):
            logits[t, (t + j) % E] = 1.0
    idx, w = reference.topk_route(logits, K)
    aux = reference.balance_loss(logits, idx, w, E, "topk")
    assert_close(aux, torch.tensor(float(K)), atol=1e-6)


def test_balance_loss_of_no_real_token_is_zero():
    logits = torch.randn(4, 3)
    idx, w = reference.topk_route(logits, 2, torch.zeros(4, dtype=torch.bool))
    assert (idx == -1).all() and (w == 0).all()
    for mode in ("topk", "softmax"):
        assert reference.balance_loss(logits, idx, w, 3, mode).item() == 0.0
