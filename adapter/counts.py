"""Parameter counts of an adapter: what it stores and what a token uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCounts:
    """total: stored parameters; active: parameters used per token (routed experts count k/E)."""

    total: int
    active: int

    def __str__(self) -> str:
        return f"{self.total / 1e6:.2f}M total, {self.active / 1e6:.2f}M active"
