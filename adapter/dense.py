"""The dense FFN adapter (paper eq. 1): y = N(W2 SiLU(W1 N(x))), no biases."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter._checks import check_adapter_input, check_field_types, check_positive
from adapter.counts import ParamCounts


@dataclass(kw_only=True)
class DenseAdapterConfig:
    """in_dim d (audio hidden), out_dim D (LLM hidden), hidden_dim of the MLP (20480 in Table 4)."""

    in_dim: int
    out_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(in_dim=self.in_dim, out_dim=self.out_dim, hidden_dim=self.hidden_dim)
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):  # inf: every output 0
            raise ValueError(f"norm_eps must be a positive finite number, got {self.norm_eps}")

    def param_counts(self) -> ParamCounts:
        d, D, H = self.in_dim, self.out_dim, self.hidden_dim
        total = 2 * d + d * H + H * D + 2 * D  # LN(d), W1, W2, LN(D)
        return ParamCounts(total=total, active=total)


class DenseAdapter(nn.Module):
    """Monolithic MLP projector mapping (..., d) -> (..., D).

    `forward(x, mask=None)`: `mask` (bool, x's leading shape) marks real tokens; padded rows come
    out as exact zeros and never influence real rows or gradients.
    """

    def __init__(self, config: DenseAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.norm_in = nn.LayerNorm(config.in_dim, eps=config.norm_eps)
        self.up = nn.Linear(config.in_dim, config.hidden_dim, bias=False)
        self.down = nn.Linear(config.hidden_dim, config.out_dim, bias=False)
        self.norm_out = nn.LayerNorm(config.out_dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_adapter_input(x, mask, self.config.in_dim, self.up.weight, "DenseAdapter")
        if mask is not None:
            x = torch.where(mask[..., None], x, 0)
        y = self.norm_out(self.down(F.silu(self.up(self.norm_in(x)))))
        if mask is not None:
            y = torch.where(mask[..., None], y, 0)
        return y

    def param_counts(self) -> ParamCounts:
        total = sum(p.numel() for p in self.parameters())
        return ParamCounts(total=total, active=total)
