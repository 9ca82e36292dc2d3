"""Run under `torchrun --nproc_per_node 2` by test_distributed.py (gloo, CPU): the global balance
loss and a user's DDP / FSDP2-wrapped HF model with a swapped-in MoEAdapter, next to one
process that holds the global batch. Rank 0 saves what both computed to argv[1]; the test compares.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from adapter import MoEAdapter, MoEAdapterConfig, swap_adapter, with_aux_loss
from adapter.hf_targets import BUILDERS, make_batch

STEPS = 3
LAMBDA = 0.5  # large, so the balance loss moves the router visibly within 3 steps


def _grads(module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, zeros where none arrived (as DDP reduces them)."""
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()}


def global_balance(rank: int, world: int, backend: str, balance_p: str, empty_rank1: bool) -> dict:
    """Rank r routes its share of 2 x 7 tokens (rank 1 pads two, or holds none); aux and the
    rank-averaged gradients against one local-scope module fed every real token."""
    cfg = dict(in_dim=8, out_dim=6, expert_dim=5, num_experts=4, top_k=2, balance_p=balance_p, backend=backend)
    torch.manual_seed(0)
    ref = MoEAdapter(MoEAdapterConfig(**cfg)).double()
    mod = MoEAdapter(MoEAdapterConfig(**cfg, balance_scope="global")).double()
    mod.load_state_dict(ref.state_dict())
    x_all = torch.randn(2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask_all = torch.ones(2, 7, dtype=torch.bool)
    mask_all[1, -2:] = False
    if empty_rank1:
        x_all, mask_all = x_all[:1], mask_all[:1]
    x, mask = x_all[rank : rank + 1], mask_all[rank : rank + 1]  # empty on rank 1 when empty_rank1
    mod(x, mask)
    aux = mod.aux_loss.detach()
    mod.aux_loss.backward()
    grads = _grads(mod)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world  # what DDP and FSDP apply
    mod.eval()
    mod(x, mask)
    ref(x_all[mask_all])
    ref.aux_loss.backward()
    own = MoEAdapter(MoEAdapterConfig(**cfg)).double()
    own.load_state_dict(ref.state_dict())
    own(x, mask)
    return {
        "aux": aux,
        "grads": grads,
        "ref_aux": ref.aux_loss.detach(),
        "ref_grads": _grads(ref),
        "eval_aux": mod.aux_loss.detach(),  # eval mode: this rank's own tokens
        "own_aux": own.aux_loss.detach(),
    }


def _model(name: str, scope: str):
    model, per_clip = BUILDERS[name]()
    torch.manual_seed(1)
    swap_adapter(model, None, "moe-8c4", backend="torch", balance_scope=scope)
    return model, per_clip


def user_model(rank: int, world: int, wrap: str) -> dict:
    """A swapped-in MoEAdapter (global balance scope) in a DDP- or FSDP2-wrapped HF model, each
    rank training on half of a 4-clip batch, against one process training on all 4."""
    name = "qwen2-audio"
    torch.manual_seed(0)
    model, per_clip = _model(name, "global")
    torch.manual_seed(0)
    ref, _ = _model(name, "local")
    batch = make_batch(name, per_clip, batch=2 * world, seed=3)
    mine = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    if wrap == "ddp":
        net = DistributedDataParallel(model)
    else:
        adapter_path = next(n for n, m in model.named_modules() if isinstance(m, MoEAdapter))
        fully_shard(model.get_submodule(adapter_path))
        for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
            fully_shard(layer)
        net = fully_shard(model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses, ref_losses = [], []
    for _ in range(STEPS):
        loss = with_aux_loss(net(**mine).loss, model, LAMBDA)
        loss.backward()
        opt.step()
        opt.zero_grad()
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        losses.append(float(logged) / world)
        ref_loss = with_aux_loss(ref(**batch).loss, ref, LAMBDA)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(float(ref_loss.detach()))
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()
    }
    return {"losses": losses, "ref_losses": ref_losses, "weights": weights, "ref_weights": dict(ref.state_dict())}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for backend in ("torch", "triton"):
        for balance_p in ("topk", "softmax"):
            results[f"balance/{backend}/{balance_p}"] = global_balance(rank, world, backend, balance_p, False)
    results["balance/torch/topk/empty-rank"] = global_balance(rank, world, "torch", "topk", True)
    for wrap in ("ddp", "fsdp"):
        results[f"user/{wrap}"] = user_model(rank, world, wrap)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
