"""Model-wide helpers over the MoE adapters a model holds: the summed balance loss, per-expert loads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from adapter.moe import MoEAdapter


def moe_adapters(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoEAdapter)]


def total_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of `aux_loss_weight * aux_loss` over every MoEAdapter in `model` after its last forward.

    Add `lambda * total_aux_loss(model)` to the task loss (paper eq. 6); None when no MoE adapter
    ran a forward since construction.
    """
    terms = [m.config.aux_loss_weight * m.aux_loss for m in moe_adapters(model) if m.aux_loss is not None]
    if not terms:
        return None
    return torch.stack([t.float() for t in terms]).sum()


def with_aux_loss(loss: torch.Tensor, model: nn.Module, weight: float = 0.01) -> torch.Tensor:
    """`loss + weight * total_aux_loss(model)` (paper eq. 6): how the balance loss of adapters swapped
    into a model whose forward has no slot for it (transformers models) reaches the training loss.
    Call it after the forward, before backward; returns `loss` unchanged when no MoE adapter ran."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"with_aux_loss: weight must be a finite number >= 0 (lambda, eq. 6), got {weight!r}")
    aux = total_aux_loss(model)
    return loss if aux is None or weight == 0 else loss + weight * aux.to(loss.dtype)


def expert_loads(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: fraction of routed pairs per expert} from each MoEAdapter's last forward."""
    loads = {}
    for name, m in model.named_modules():
        if isinstance(m, MoEAdapter) and m.expert_counts is not None:
            counts = m.expert_counts.double()
            loads[name] = counts / counts.sum().clamp(min=1)
    return loads
