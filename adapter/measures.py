"""The paper's analyses (section 5) as model-agnostic functions: any model, any labelled data.

- `activation_rates`  token-normalized activation rate of each routed expert per category (Fig. 3):
                      the fraction of a category's tokens that chose the expert (rows sum to k).
- `gradient_vector`   one flat float64 gradient of a loss w.r.t. a list of parameters.
- `cosine_matrix`     Sim(g_i, g_j) = g_i . g_j / (|g_i| |g_j|) between categories (eq. 11, Fig. 4).
- `influence_matrix`  I_ij = Delta_j L_i / Delta_i L_i (eq. 12, Fig. 5), where Delta_j L_i is the
                      drop of category i's loss after the simulated normalized step
                      theta - lambda g_j / |g_j| on category j's gradient. The step is undone exactly.

To first order Delta_j L_i = lambda g_i . g_j / |g_j| and Delta_i L_i = lambda |g_i|, so I_ij tends to
cos(g_i, g_j) as lambda -> 0; a finite lambda adds the curvature between the two categories
(`tests/adapter/test_measures.py` checks both against hand computations).

`adapter.lalm.studies.analysis` runs these on the reference LALM; these functions only need callables that
return a category's scalar loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


def activation_rates(topk_idx_NK: torch.Tensor, categories: Sequence[str], num_experts: int) -> dict[str, list[float]]:
    """{category: [rate of expert e for e < E]} from the experts each token chose.

    topk_idx_NK: (N, k) integer expert ids per token, -1 on padding rows (skipped).
    categories: N labels, one per token row.
    """
    if topk_idx_NK.dim() != 2:
        raise ValueError(f"topk_idx_NK must be (N, k), got shape {tuple(topk_idx_NK.shape)}")
    if len(categories) != topk_idx_NK.shape[0]:
        raise ValueError(f"{len(categories)} category labels for {topk_idx_NK.shape[0]} token rows")
    idx = topk_idx_NK.detach().long().cpu()
    real_N = (idx >= 0).all(dim=1)
    if idx.numel() and int(idx.max()) >= num_experts:
        raise ValueError(f"expert id {int(idx.max())} out of range for num_experts={num_experts}")
    labels = sorted(set(categories))
    code_N = torch.tensor([labels.index(c) for c in categories], dtype=torch.long)
    rates = {}
    for c, label in enumerate(labels):
        rows = idx[real_N & (code_N == c)]
        if rows.shape[0] == 0:
            continue
        counts = torch.bincount(rows.reshape(-1), minlength=num_experts).double()
        rates[label] = (counts / rows.shape[0]).tolist()
    return rates


def gradient_vector(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """d loss / d params flattened into one float64 vector (zeros for parameters the loss skips,
    e.g. experts no token of the category chose)."""
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def cosine_matrix(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(C, C) pairwise cosine similarity of the gradient vectors, in the mapping's order.
    A zero gradient has no direction: its row and column are NaN."""
    if not grads:
        raise ValueError("no gradients given")
    G = torch.stack([g.reshape(-1).double() for g in grads.values()])
    norms = G.norm(dim=1)
    cos = ((G @ G.T) / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)
    cos.diagonal().fill_(1.0)  # exactly, not 1 - rounding
    zero = norms == 0
    cos[zero, :] = float("nan")
    cos[:, zero] = float("nan")
    return cos


@dataclass
class Influence:
    """names: the categories; loss (C,) before any step; delta (C, C): delta[i, j] = Delta_j L_i;
    score (C, C): delta[i, j] / delta[i, i] (eq. 12 for one batch)."""

    names: list[str]
    loss: torch.Tensor
    delta: torch.Tensor
    score: torch.Tensor


def influence_matrix(
    params: Sequence[torch.nn.Parameter],
    losses: Mapping[str, Callable[[], torch.Tensor]],
    step_size: float,
) -> Influence:
    """Simulate theta - step_size * g_j / |g_j| for each category j, measure every category's loss
    after it, and restore theta bit for bit. `losses[c]()` must be deterministic (eval mode)."""
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    params = list(params)
    names = list(losses)
    C = len(names)
    with torch.no_grad():
        before = torch.tensor([float(losses[c]()) for c in names], dtype=torch.float64)
    delta = torch.full((C, C), float("nan"), dtype=torch.float64)
    saved = [p.detach().clone() for p in params]
    for j, cj in enumerate(names):
        g = gradient_vector(losses[cj](), params)
        norm = g.norm()
        if not (torch.isfinite(norm) and norm > 0):
            continue  # no direction to step in: the column stays NaN
        step = (-step_size * g / norm).split([p.numel() for p in params])
        try:
            with torch.no_grad():
                for p, s in zip(params, step, strict=True):
                    p.add_(s.view_as(p).to(p.dtype))
                after = torch.tensor([float(losses[c]()) for c in names], dtype=torch.float64)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        delta[:, j] = before - after
    score = delta / delta.diagonal()[:, None]
    return Influence(names, before, delta, score)
