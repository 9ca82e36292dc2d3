"""routing.py kernels against reference.topk_route / balance_loss (float64 ground truth)."""

import pytest
import torch

from moe_kernels import reference, routing
from tests.utils import assert_close, max_rel_error

CASES = [  # T, E, K
    (1, 1, 1),
    (1, 3, 2),
    (7, 3, 3),
    (64, 8, 2),
    (129, 8, 1),
    (129, 8, 8),
    (33, 128, 4),
    (50, 5, 5),
]


def _logits(T, E, dtype, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if pattern == "skewed":
        logits[:, 0] += 50.0  # every token's best expert is 0
    elif pattern == "ties":
        logits = torch.randint(-2, 3, (T, E), generator=g).float()  # many exact ties
    return logits.to(dtype)


def _run(logits, K, mask, mode):
    r = routing.router_forward(logits, K, mask, mode)
    counts, dp, aux = routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, K)
    return r, counts, dp, aux


@pytest.mark.parametrize("mode", ["topk", "softmax"])
@pytest.mark.parametrize("pattern", ["uniform", "skewed", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("T,E,K", CASES)
def test_router_forward_and_backward(T, E, K, dtype, pattern, mode):
    logits = _logits(T, E, dtype, pattern)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(1)) > 0.25
    r, counts, dp, aux = _run(logits, K, mask, mode)

    logits64 = logits.double().requires_grad_(True)  # the same values, routed in float64
    idx_ref, w_ref = reference.topk_route(logits64, K, mask)
    aux_ref = reference.balance_loss(logits64, idx_ref, w_ref, E, mode)
    assert torch.equal(r.topk_idx_TK, idx_ref)  # selection is exact: ties to the lower index
    assert torch.equal(counts, reference.expert_counts(idx_ref, E))
    assert r.topk_weight_TK.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_rel_error(r.topk_weight_TK, w_ref) <= tol
    assert_close(aux, aux_ref, rtol=tol, atol=tol, name="aux")

    g = torch.Generator().manual_seed(2)
    dw = torch.randn(T, K, generator=g, dtype=torch.float64)
    daux = torch.tensor(0.37, dtype=torch.float64)
    (dlogits_ref,) = torch.autograd.grad((w_ref * dw).sum() + daux * aux_ref, logits64)
    dlogits = routing.router_backward(
        logits, r.topk_idx_TK, r.topk_weight_TK, dw.to(r.topk_weight_TK.dtype), daux.to(aux.dtype), dp, mode
    )
    assert dlogits.dtype == dtype
    if dtype == torch.float16:  # the gradient is rounded to fp16 once, at the store
        assert_close(dlogits, dlogits_ref, rtol=1e-3, atol=1e-4, name="dlogits")
    else:
        assert max_rel_error(dlogits, dlogits_ref) <= tol


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_logits_follow_the_reference():
    logits = torch.randn(6, 5)
    logits[1, 2] = float("nan")  # a NaN that loses the selection: weights stay finite
    logits[2] = float("nan")  # a token whose logits are all NaN
    logits[3] = float("-inf")  # all -inf: experts 0..k-1 by the tie rule, NaN weights
    logits[4, 3] = float("inf")
    r, counts, _, aux = _run(logits, 2, None, "topk")
    idx_ref, w_ref = reference.topk_route(logits, 2)
    assert torch.equal(r.topk_idx_TK, idx_ref)
    assert_close(r.topk_weight_TK, w_ref, atol=1e-6, name="weights with NaN/inf")
    assert torch.isfinite(r.topk_weight_TK[1]).all() and torch.isnan(r.topk_weight_TK[2]).all()
    assert torch.isnan(aux)
    assert int(counts.sum()) == 12


def test_all_masked_gives_zero_loss_and_gradient():
    logits = torch.randn(20, 4, requires_grad=False)
    mask = torch.zeros(20, dtype=torch.bool)
    r, counts, dp, aux = _run(logits, 2, mask, "softmax")
    assert (r.topk_idx_TK == -1).all() and (r.topk_weight_TK == 0).all()
    assert aux.item() == 0.0 and int(counts.sum()) == 0
    d = routing.router_backward(
        logits, r.topk_idx_TK, r.topk_weight_TK, torch.ones(20, 2), torch.tensor(1.0), dp, "softmax"
    )
    assert (d == 0).all()


def test_host_checks_name_values():
    with pytest.raises(ValueError, match="top_k=4, E=3"):
        routing.router_forward(torch.randn(5, 3), 4, None, "topk")
    with pytest.raises(ValueError, match="E=129"):
        routing.router_forward(torch.randn(5, 129), 2, None, "topk")
    with pytest.raises(ValueError, match="T >= 1"):
        routing.router_forward(torch.randn(0, 3), 1, None, "topk")
    with pytest.raises(ValueError, match="token_mask_T must be bool"):
        routing.router_forward(torch.randn(5, 3), 1, torch.ones(5), "topk")
