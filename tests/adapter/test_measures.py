"""adapter/measures.py against hand computations: known vectors, a quadratic loss, a forced router."""

import math

import pytest
import torch

from adapter import MoEAdapter, MoEAdapterConfig
from adapter.measures import activation_rates, cosine_matrix, gradient_vector, influence_matrix
from tests.utils import assert_close


def test_cosine_of_known_vectors():
    grads = {
        "a": torch.tensor([1.0, 0.0]),
        "b": torch.tensor([1.0, 1.0]),
        "c": torch.tensor([-2.0, 0.0]),
        "d": torch.tensor([0.0, 3.0]),
    }
    r = 1 / math.sqrt(2)
    expected = torch.tensor(
        [
            [1.0, r, -1.0, 0.0],
            [r, 1.0, -r, r],
            [-1.0, -r, 1.0, 0.0],
            [0.0, r, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    assert_close(cosine_matrix(grads), expected, atol=1e-15, name="cosine")


def test_cosine_of_a_zero_gradient_is_nan():
    cos = cosine_matrix({"a": torch.tensor([1.0, 2.0]), "zero": torch.zeros(2)})
    assert cos[0, 0] == 1.0 and cos[0, 1].isnan() and cos[1, 0].isnan() and cos[1, 1].isnan()
    with pytest.raises(ValueError, match="no gradients"):
        cosine_matrix({})


def test_gradient_vector_flattens_and_zero_fills_unused_parameters():
    a = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    unused = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.tensor([5.0]))
    loss = (a**2).sum() + 3 * b.sum()  # d/da = 2a, d/db = 3
    g = gradient_vector(loss, [a, unused, b])
    assert g.dtype == torch.float64
    assert g.tolist() == [2.0, 4.0, 6.0, 8.0, 0.0, 0.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="scalar"):
        gradient_vector(a.sum(1), [a])


def _quadratic_losses(theta, targets, H):
    """L_i(theta) = 1/2 (theta - a_i)^T H (theta - a_i)."""
    return {name: (lambda a=a: 0.5 * (theta - a) @ (H @ (theta - a))) for name, a in targets.items()}


def test_influence_of_an_isotropic_quadratic_by_hand():
    # theta = 0, a_x = (3, 0), a_y = (0, 4), H = I, lambda = 1/2:  g_x = (-3, 0), g_y = (0, -4).
    # Delta_j L_i = lambda g_i . u_j - lambda^2 / 2 with u_j = g_j / |g_j|:
    #   Delta_x L_x = 1.5 - 0.125 = 1.375     Delta_y L_x = 0 - 0.125 = -0.125
    #   Delta_y L_y = 2.0 - 0.125 = 1.875     Delta_x L_y = -0.125
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    losses = _quadratic_losses(
        theta,
        {"x": torch.tensor([3.0, 0.0], dtype=torch.float64), "y": torch.tensor([0.0, 4.0], dtype=torch.float64)},
        torch.eye(2, dtype=torch.float64),
    )
    r = influence_matrix([theta], losses, step_size=0.5)
    assert r.names == ["x", "y"]
    assert r.loss.tolist() == [4.5, 8.0]
    assert_close(r.delta, torch.tensor([[1.375, -0.125], [-0.125, 1.875]], dtype=torch.float64), atol=1e-15)
    assert_close(r.score, torch.tensor([[1.0, -1 / 11], [-1 / 15, 1.0]], dtype=torch.float64), atol=1e-15)
    assert theta.detach().tolist() == [0.0, 0.0]  # the simulated step is undone


def test_influence_of_a_general_quadratic_matches_its_closed_form():
    # With curvature H: Delta_j L_i = lambda g_i . u_j - lambda^2 / 2 u_j^T H u_j, g_i = H (theta - a_i).
    torch.manual_seed(0)
    n = 5
    M = torch.randn(n, n, dtype=torch.float64)
    H = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    start = torch.randn(n, dtype=torch.float64)
    theta = torch.nn.Parameter(start.clone())
    targets = {c: torch.randn(n, dtype=torch.float64) for c in ("speech", "sound", "music")}
    lam = 0.3
    r = influence_matrix([theta], _quadratic_losses(theta, targets, H), step_size=lam)
    g = {c: H @ (start - a) for c, a in targets.items()}
    names = list(targets)
    delta = torch.empty(3, 3, dtype=torch.float64)
    for i, ci in enumerate(names):
        for j, cj in enumerate(names):
            u = g[cj] / g[cj].norm()
            delta[i, j] = lam * (g[ci] @ u) - 0.5 * lam**2 * (u @ H @ u)
    assert_close(r.delta, delta, rtol=1e-12, atol=1e-12, name="delta")
    assert_close(r.score, delta / delta.diagonal()[:, None], rtol=1e-12, atol=1e-12, name="score")
    assert torch.equal(theta.detach(), start)  # restored bit for bit


def test_influence_tends_to_the_cosine_for_small_steps():
    torch.manual_seed(1)
    theta = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    targets = {c: torch.randn(4, dtype=torch.float64) for c in "abc"}
    losses = _quadratic_losses(theta, targets, H)
    grads = {c: gradient_vector(fn(), [theta]) for c, fn in losses.items()}
    r = influence_matrix([theta], losses, step_size=1e-7)
    assert_close(r.score, cosine_matrix(grads), atol=1e-5, name="influence vs cosine")


def test_influence_with_a_zero_gradient_leaves_that_column_nan():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    losses = {"flat": lambda: (theta * 0).sum(), "bowl": lambda: (theta - 1).pow(2).sum()}
    r = influence_matrix([theta], losses, step_size=0.1)
    assert r.delta[:, 0].isnan().all() and not r.delta[:, 1].isnan().any()
    with pytest.raises(ValueError, match="step_size"):
        influence_matrix([theta], losses, step_size=0.0)


def _forced_router_adapter():
    """d = 8, E = 4, k = 2; expert e's router row reads input coordinate e with a large weight, so a
    token 5 e_a + 3 e_b (after LayerNorm still largest at a, then b) chooses experts {a, b}."""
    m = MoEAdapter(MoEAdapterConfig(in_dim=8, out_dim=6, expert_dim=4, num_experts=4, top_k=2, backend="torch"))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :4] = 50 * torch.eye(4)
    return m


def _token(a, b):
    x = torch.zeros(8)
    x[a], x[b] = 5.0, 3.0
    return x


def test_activation_rates_of_a_forced_router():
    m = _forced_router_adapter()
    # speech: 3 tokens on {0, 1}; music: 2 on {2, 3}; sound: 1 on {0, 2}, 1 on {3, 1}.
    plan = [("speech", 0, 1)] * 3 + [("music", 2, 3)] * 2 + [("sound", 0, 2), ("sound", 3, 1)]
    x = torch.stack([_token(a, b) for _, a, b in plan])
    m(x)
    assert sorted(map(sorted, m.last_topk_idx.tolist())) == sorted(sorted((a, b)) for _, a, b in plan)
    rates = activation_rates(m.last_topk_idx, [c for c, _, _ in plan], num_experts=4)
    assert rates == {
        "music": [0.0, 0.0, 1.0, 1.0],
        "sound": [0.5, 0.5, 0.5, 0.5],
        "speech": [1.0, 1.0, 0.0, 0.0],
    }
    assert all(sum(row) == 2 for row in rates.values())  # rows sum to k


def test_activation_rates_skip_padding_and_check_input():
    m = _forced_router_adapter()
    x = torch.stack([_token(0, 1), _token(2, 3), _token(1, 0)])[None]
    m(x, mask=torch.tensor([[True, False, True]]))
    rates = activation_rates(m.last_topk_idx, ["speech", "music", "speech"], num_experts=4)
    assert rates == {"speech": [1.0, 1.0, 0.0, 0.0]}  # the padded music token is not counted
    with pytest.raises(ValueError, match="3 token rows"):
        activation_rates(m.last_topk_idx, ["speech"], num_experts=4)
    with pytest.raises(ValueError, match="out of range"):
        activation_rates(torch.tensor([[5, 1]]), ["speech"], num_experts=4)
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        activation_rates(torch.tensor([1, 2]), ["speech", "music"], num_experts=4)
