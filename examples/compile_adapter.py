"""torch.compile a model holding an MoEAdapter: no graph break inside the adapter, same numbers.

python examples/compile_adapter.py                 # CPU: torch backend, inductor
python examples/compile_adapter.py --cuda-graphs   # CUDA: Triton kernels, mode="reduce-overhead"
"""

import argparse
import time

import torch

from adapter import MoEAdapter, preset, total_aux_loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens per batch")
    p.add_argument("--dim", type=int, default=128, help="adapter input width d (output: 3d/4)")
    p.add_argument("--cuda-graphs", action="store_true", help="compile with mode='reduce-overhead' (CUDA only)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    adapter = MoEAdapter(preset("moe-8c4", args.dim, 3 * args.dim // 4)).to(device, dtype)
    x = torch.randn(4, args.tokens // 4, args.dim, device=device, dtype=dtype)

    def step(x):
        y = adapter(x)
        return y.float().square().mean() + 0.01 * total_aux_loss(adapter)

    explained = torch._dynamo.explain(step)(x)
    print(f"graphs: {explained.graph_count}, graph breaks: {explained.graph_break_count}")
    mode = "reduce-overhead" if args.cuda_graphs and device == "cuda" else None
    compiled = torch.compile(step, mode=mode, fullgraph=True)
    eager_loss = step(x)
    eager_loss.backward()
    eager_grad = adapter.w1.grad.clone()
    adapter.zero_grad()
    t0 = time.perf_counter()
    for _ in range(3):  # compile, then (with CUDA graphs) record and replay
        adapter.zero_grad(set_to_none=False)
        loss = compiled(x)
        loss.backward()
    print(f"compiled 3 steps in {time.perf_counter() - t0:.1f} s (includes compilation)")
    print(f"loss eager {eager_loss.item():.6f} compiled {loss.item():.6f}")
    print(f"max |dW1 compiled - eager| = {(adapter.w1.grad - eager_grad).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
