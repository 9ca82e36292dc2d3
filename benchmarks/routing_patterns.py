"""Inputs whose routing follows a chosen pattern, for any MoE adapter with the default LayerNorm.

Every token gets a large shared component along a zero-mean unit direction u, so after the
adapter's LayerNorm z.u is nearly the same positive value s for all tokens. Router row e is set to
(a_e / s) u + noise, which makes logit_e = a_e + N(0, 1): the pattern lives in a_e.
  uniform  a_e = 0                                 every expert equally likely
  zipf     a_e = log((e + 1) ** -1.2)              loads fall off like a Zipf law
  one      a_0 = 20, a_e = 0 otherwise             every token's first choice is expert 0
The load each pattern actually produces is measured and reported (max/mean tokens per expert).
"""

from __future__ import annotations

import math

import torch

ROUTINGS = ("uniform", "zipf", "one")


def make_tokens(tokens: int, d: int, device, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u - u.mean()
    u = u / u.norm()
    x = torch.randn(tokens, d, generator=g) + 3.0 * math.sqrt(d) * u
    return x.to(device, dtype), u


@torch.no_grad()
def set_router(modules, u: torch.Tensor, x: torch.Tensor, routing: str, seed: int = 0) -> None:
    """Give every MoE module in `modules` the same router weights for `routing`."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    first = modules[0]
    E = first.config.num_experts
    d = first.config.in_dim
    z = first.norm_in(x[:4096].to(first.w1.dtype)).float().cpu()
    proj = z @ u
    s = proj.mean().item()
    perp_norm = (z - proj[:, None] * u).pow(2).sum(1).mean().sqrt().item()  # |z| off u
    if routing == "uniform":
        a = torch.zeros(E)
    elif routing == "zipf":
        a = torch.log(torch.arange(1, E + 1, dtype=torch.float32) ** -1.2)
    else:
        a = torch.zeros(E)
        a[0] = 20.0
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(E, d, generator=g)
    noise -= (noise @ u)[:, None] * u  # keep the noise off u so the offsets stay exact
    weight = a[:, None] / s * u[None, :] + noise / perp_norm  # z.noise_e ~ N(0, 1)
    for m in modules:
        m.router.weight.copy_(weight.to(m.router.weight.dtype))
