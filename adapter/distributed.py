"""The balance loss over the global batch of a data-parallel run (paper eq. 8-10, GShard's and
Megatron's "global" load balancing): what `MoEAdapterConfig.balance_scope = "global"` computes.

Shape legend: T tokens, K experts per token, E experts; R data-parallel ranks.

Local scope (the default) computes L_aux = E * sum_e P_e f_e over the tokens of one rank's call.
Global scope all-reduces, before eq. 10, each rank's per-expert probability sums, routed counts
and real-token count, so P and f are those of the R ranks' tokens together:

    P_e = sum_r psum_{r,e} / B,   f_e = sum_r count_{r,e} / B,   B = sum_r B_r

f carries no gradient (as in eq. 10); P's gradient flows through the local probabilities only
(the other ranks' sums arrive detached). Every rank returns the same value. Its gradient is
R x dL/d(local probabilities): DistributedDataParallel and FSDP average gradients over the R
ranks, so a model trained with `task + lambda * aux` on R ranks gets, summed over ranks and
divided by R, exactly the gradient of L_aux over the global batch, as one process holding the
global batch would (tests/adapter/test_distributed.py checks it on 2 CPU processes).

It is a collective: in training mode every rank of the group must call the adapter the same
number of times (a rank without tokens calls it on an empty input).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_kernels.reference import MoEOutput, routing_dtype


def group_size(group=None) -> int:
    """Ranks in `group` (the default group when None); 1 when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def local_probability_sums(
    out: MoEOutput, z_TD: torch.Tensor, router_weight_ED: torch.Tensor, balance_p: str
) -> torch.Tensor:
    """(E,) sum over this call's real tokens of p_e (differentiable): G over the chosen experts
    ("topk", eq. 8) or the full softmax of the router logits ("softmax")."""
    E = router_weight_ED.shape[0]
    idx_TK = out.topk_idx_TK
    acc = routing_dtype(z_TD.dtype)
    if balance_p == "topk":
        valid_TK = idx_TK >= 0
        weight = torch.where(valid_TK, out.topk_weight_TK.to(acc), 0.0)
        return torch.zeros(E, dtype=acc, device=z_TD.device).index_add(
            0, idx_TK.clamp(min=0).reshape(-1).long(), weight.reshape(-1)
        )
    real_T = idx_TK[:, 0] >= 0 if idx_TK.shape[0] else torch.zeros(0, dtype=torch.bool, device=z_TD.device)
    probs_TE = torch.softmax(F.linear(z_TD, router_weight_ED).to(acc), dim=-1)
    return torch.where(real_T[:, None], probs_TE, 0.0).sum(0)


def global_balance_loss(psum_E: torch.Tensor, counts_E: torch.Tensor, num_real: int | torch.Tensor, group=None):
    """L_aux over the group's tokens together, from this rank's probability sums `psum_E`
    (differentiable), routed counts `counts_E` and real-token count; see the module docstring."""
    E = psum_E.shape[0]
    if counts_E.shape != (E,):
        raise ValueError(f"counts_E must have shape ({E},) like psum_E, got {tuple(counts_E.shape)}")
    stats = torch.cat(
        [
            psum_E.detach().double(),
            counts_E.double(),
            torch.as_tensor(num_real, dtype=torch.float64, device=psum_E.device).reshape(1),
        ]
    )
    world = group_size(group)
    if world > 1:
        dist.all_reduce(stats, group=group)
    tokens = stats[2 * E].clamp(min=1)
    f_E = stats[E : 2 * E] / tokens
    value = E * (stats[:E] / tokens * f_E).sum()
    local = E * (psum_E * f_E.to(psum_E.dtype)).sum() / tokens.to(psum_E.dtype)
    return value.to(psum_E.dtype) + world * (local - local.detach())
