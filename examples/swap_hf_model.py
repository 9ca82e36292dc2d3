"""Swap an MoE adapter into a transformers audio LLM, train it, save it, load it back.

    python examples/swap_hf_model.py --model voxtral --upcycle --steps 20
    python examples/swap_hf_model.py --model-dir /models/Qwen2-Audio-7B-Instruct ...   # a local checkpoint

Without --model-dir the model is a small random one built from a config (no download). With
--upcycle the MoE adapter starts from the projector's own weights and the model's outputs do not
change at the swap (printed); the balance loss joins the loss through `with_aux_loss`.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from adapter import swap_adapter, with_aux_loss
from adapter.hf_targets import BUILDERS, make_batch
from adapter.serialization import load_swapped, save_swapped


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(BUILDERS), default="qwen2-audio", help="which small random model")
    p.add_argument("--model-dir", help="a local transformers checkpoint instead (its batch is up to you)")
    p.add_argument("--preset", default="moe-8c4", help="adapter preset to swap in")
    p.add_argument("--upcycle", action="store_true", help="start the MoE adapter from the projector's weights")
    p.add_argument("--steps", type=int, default=10, help="training steps")
    p.add_argument("--aux-weight", type=float, default=0.01, help="lambda of the balance loss")
    p.add_argument("--out", type=Path, help="where to save the swapped model (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.model_dir:
        import transformers

        arch = transformers.AutoConfig.from_pretrained(args.model_dir).architectures[0]  # e.g. VoxtralFor...
        model = getattr(transformers, arch).from_pretrained(args.model_dir)
        handle = swap_adapter(model, adapter=args.preset, upcycle=args.upcycle)
        print(f"swapped {[s.path for s in handle]} in {type(model).__name__}; build your batch and train as below")
        return
    torch.manual_seed(0)
    model, tokens = BUILDERS[args.model]()
    batch = make_batch(args.model, tokens)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    handle = swap_adapter(model, adapter=args.preset, upcycle=args.upcycle)  # the one line
    (swap,) = handle
    with torch.no_grad():
        after = model(**batch).logits
    print(f"{swap.path}: {type(swap.original).__name__} -> {swap.adapter.config}")
    print(f"max |logits change| at the swap: {(after - before).abs().max().item():.3g}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.steps):
        out = model(**batch)
        loss = with_aux_loss(out.loss, model, weight=args.aux_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step}: loss {out.loss.item():.4f}  aux {swap.adapter.aux_loss.item():.3f}")

    out_dir = args.out or Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    save_swapped(model, out_dir / "model.safetensors")
    fresh, _ = BUILDERS[args.model]()
    load_swapped(fresh, out_dir / "model.safetensors")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, fresh(**batch).logits)
    print(f"saved to {out_dir / 'model.safetensors'}; reloaded into a fresh model: identical logits = {same}")


if __name__ == "__main__":
    main()
