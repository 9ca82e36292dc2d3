"""Train the dense and the MoE adapter on the same synthetic heterogeneous data and compare them.

Tokens come from three categories ("speech", "music", "sound"), each on its own low-rank manifold
with its own target map (a random teacher MLP per category), so a single dense map must serve
three unrelated functions, the situation the paper's MoE adapter is designed for. Both adapters
use the paper's presets scaled to --in-dim; the script prints validation error per category and
the MoE's expert load per category (the paper's Figure 3 as a table).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter import MoEAdapter, build_adapter, preset, total_aux_loss

CATEGORIES = ("speech", "music", "sound")


class HeterogeneousTokens:
    """Three token distributions, each with its own target function."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, rank
        self.bases = [torch.linalg.qr(torch.randn(in_dim, rank, generator=g))[0] for _ in CATEGORIES]
        self.means = [2.0 * torch.randn(in_dim, generator=g) / in_dim**0.5 for _ in CATEGORIES]
        self.teachers = [
            (
                torch.randn(in_dim, 4 * rank, generator=g) / in_dim**0.5,
                torch.randn(4 * rank, out_dim, generator=g) / (4 * rank) ** 0.5,
            )
            for _ in CATEGORIES
        ]

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cat = torch.randint(len(CATEGORIES), (n,), generator=g)
        u = torch.randn(n, self.rank, generator=g)
        x = torch.empty(n, self.in_dim)
        y = torch.empty(n, self.out_dim)
        for c, (basis, mean, (t1, t2)) in enumerate(zip(self.bases, self.means, self.teachers, strict=True)):
            sel = cat == c
            x[sel] = u[sel] @ basis.T * self.in_dim**0.5 / self.rank**0.5 + mean * self.in_dim**0.5
            y[sel] = F.layer_norm(F.silu(x[sel] @ t1) @ t2, (self.out_dim,))
        return x, y, cat


def train(model: nn.Module, data: HeterogeneousTokens, args: argparse.Namespace) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    for step in range(args.steps):
        x, y, _ = data.sample(args.batch, g)
        loss = F.mse_loss(model(x), y)
        aux = total_aux_loss(model)
        total = loss if aux is None else loss + args.aux_lambda * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {step + 1:5d}  mse {sum(losses[-50:]) / len(losses[-50:]):.4f}", flush=True)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: HeterogeneousTokens, seed: int) -> dict[str, float]:
    x, y, cat = data.sample(6000, torch.Generator().manual_seed(seed + 999))
    err = (model(x) - y).pow(2).mean(-1)
    out = {name: err[cat == c].mean().item() for c, name in enumerate(CATEGORIES)}
    out["all"] = err.mean().item()
    return out


@torch.no_grad()
def expert_load_by_category(model: MoEAdapter, data: HeterogeneousTokens, seed: int) -> torch.Tensor:
    x, _, cat = data.sample(6000, torch.Generator().manual_seed(seed + 999))
    model(x)
    E = model.config.num_experts
    rates = torch.zeros(len(CATEGORIES), E)
    for c in range(len(CATEGORIES)):
        idx = model.last_topk_idx[cat == c].long().reshape(-1)
        rates[c] = torch.bincount(idx, minlength=E).float() / max(1, int((cat == c).sum()))
    return rates  # token-normalized activation rate: each row sums to k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-dim", type=int, default=64, help="adapter input width d (paper: 2560)")
    p.add_argument("--out-dim", type=int, default=48, help="adapter output width D (paper: 2048)")
    p.add_argument("--rank", type=int, default=8, help="dimension of each category's token manifold")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per adapter")
    p.add_argument("--batch", type=int, default=256, help="tokens per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--aux-lambda", type=float, default=0.01, help="weight of the balance loss (eq. 6)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="MoE kernels")
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    args = p.parse_args()

    data = HeterogeneousTokens(args.in_dim, args.out_dim, args.rank, args.seed)
    results = {}
    for name in ("dense", "moe-8c4"):
        torch.manual_seed(args.seed)
        overrides = {} if name == "dense" else {"backend": args.backend}
        model = build_adapter(preset(name, args.in_dim, args.out_dim, **overrides))
        print(f"{name}: {model.param_counts()}")
        t0 = time.perf_counter()
        train(model, data, args)
        results[name] = evaluate(model, data, args.seed)
        print(f"  trained in {time.perf_counter() - t0:.1f} s (CPU)" if not torch.cuda.is_available() else "")
        if isinstance(model, MoEAdapter):
            rates = expert_load_by_category(model, data, args.seed)

    print("\nvalidation MSE (lower is better)")
    print(f"{'adapter':10s}" + "".join(f"{c:>9s}" for c in (*CATEGORIES, "all")))
    for name, r in results.items():
        print(f"{name:10s}" + "".join(f"{r[c]:9.4f}" for c in (*CATEGORIES, "all")))
    print("\nMoE expert activation rate per category (tokens routed to the expert / category tokens)")
    print(f"{'':10s}" + "".join(f"{'e' + str(e):>7s}" for e in range(rates.shape[1])))
    for c, name in enumerate(CATEGORIES):
        print(f"{name:10s}" + "".join(f"{v:7.2f}" for v in rates[c].tolist()))


if __name__ == "__main__":
    main()
