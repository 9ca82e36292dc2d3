"""The paper's section-5 analyses on your own model: per-category gradient cosine (eq. 11) and
influence scores (eq. 12) of the adapter's parameters, and expert activation rates (Fig. 3).

    python examples/gradient_conflict.py

Here the "model" is an MoE adapter on synthetic data from three categories whose targets need
different maps; swap in your model, its adapter's parameters and a loss per category.
"""

import argparse

import torch

from adapter import MoEAdapter, preset
from adapter.measures import activation_rates, cosine_matrix, gradient_vector, influence_matrix


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=32, help="adapter width")
    p.add_argument("--tokens", type=int, default=256, help="tokens per category")
    p.add_argument("--step-size", type=float, default=1e-2, help="lambda of the influence score")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    d = args.dim
    adapter = MoEAdapter(preset("moe-8c4", d, d, backend="torch")).eval()
    data = {}
    for k, cat in enumerate(("speech", "sound", "music")):  # shifted inputs, a different target map each
        x = torch.randn(args.tokens, d) + 2.0 * torch.eye(d)[k]
        data[cat] = (x, x @ torch.randn(d, d) / d**0.5)

    def loss_of(cat):
        x, y = data[cat]
        return lambda: (adapter(x) - y).square().mean()

    params = list(adapter.parameters())
    grads = {c: gradient_vector(loss_of(c)(), params) for c in data}
    print("gradient cosine (eq. 11):\n", cosine_matrix(grads).numpy().round(3))
    infl = influence_matrix(params, {c: loss_of(c) for c in data}, args.step_size)
    print("influence I_ij, row i loss of, column j step on (eq. 12):\n", infl.score.numpy().round(3))
    chosen, labels = [], []
    for cat, (x, _) in data.items():
        adapter(x)
        chosen.append(adapter.last_topk_idx)
        labels += [cat] * x.shape[0]
    for cat, rates in activation_rates(torch.cat(chosen), labels, adapter.config.num_experts).items():
        print(f"{cat:7s}", " ".join(f"{r:.2f}" for r in rates))


if __name__ == "__main__":
    main()
