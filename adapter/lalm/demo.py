"""The main job: build the heterogeneous corpus, train the reference LALM once with the dense
adapter and once with the MoE adapter on the same data and budget, evaluate both, and print a
table in the shape of the paper's Table 1 (per-category accuracy, text vs audio knowledge
accuracy and the modality gap, balance loss, expert loads), plus a plot.

    python -m adapter.lalm.demo                     # CPU, a few minutes
    python -m adapter.lalm.demo --size full --steps 20000 --audio-dim 512 ...   # larger settings

Both models share everything but the adapter: encoder (random 'demo' Whisper, frozen), LLM
(small random Qwen3, trained), semantic stream, data order, seed, steps and learning rate. The
adapters are the paper's presets scaled to --audio-dim (dense: hidden 8d; MoE: 8 experts, top-4,
f = d/2, aggregation 4d).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from adapter.lalm.config import ModelConfig, TrainConfig
from adapter.lalm.corpus import SIZES, build_corpus
from adapter.lalm.data import FeatureSource, read_manifest
from adapter.lalm.evaluate import evaluate, format_table
from adapter.lalm.train import load_trained, train


def run_demo(args) -> dict:
    t0 = time.perf_counter()
    from dataclasses import replace

    corpus_cfg = replace(SIZES[args.size], seed=args.seed)
    if args.train_per_task:
        corpus_cfg = replace(corpus_cfg, train_per_task=args.train_per_task)
    manifests = build_corpus(args.corpus, corpus_cfg, progress=not args.quiet)
    print(f"corpus ready in {time.perf_counter() - t0:.0f} s: {args.corpus}", flush=True)
    test = read_manifest(manifests["test"])
    out = Path(args.out)
    results, summaries, logs = {}, {}, {}
    for name in ("dense", "moe-8c4"):
        run_dir = out / name
        model_cfg = ModelConfig(
            adapter=name,
            audio_dim=args.audio_dim,
            semantic_codes=args.semantic_codes,
            tiny_llm_hidden=args.llm_hidden,
            tiny_llm_layers=args.llm_layers,
            adapter_backend="auto",
        )
        cfg = TrainConfig(
            train_manifest=f"{manifests['train']},{manifests['text']}*{args.text_weight}",
            val_manifest=str(manifests["val"]),
            output_dir=str(run_dir),
            model=model_cfg,
            seed=args.seed,
            max_steps=args.steps,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 20),
            decay_fraction=0.2,
            max_batch_size=args.batch_size,
            max_batch_tokens=args.batch_size * 160,
            aux_lambda=args.aux_lambda,
            eval_every=max(1, args.steps // 4),
            save_every=max(1, args.steps // 4),
            progress=not args.quiet,
            resume=args.resume,
            overwrite=not args.resume,  # a demo rerun trains afresh unless asked to resume
        )
        t1 = time.perf_counter()
        summaries[name] = train(cfg)
        print(f"{name}: trained {args.steps} steps in {time.perf_counter() - t1:.0f} s", flush=True)
        model = load_trained(run_dir)
        source = FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder)
        results[name] = evaluate(model, test, source, seed=args.seed)
        (run_dir / "eval.json").write_text(json.dumps(results[name], indent=1))
        logs[name] = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    table = format_table(results)
    aux = [r["aux"] for r in logs["moe-8c4"] if "aux" in r][-10:]
    extra = [
        f"{'balance loss L_aux (MoE)':28s}{sum(aux) / max(1, len(aux)):12.3f}  (last 10 steps; balanced: k = 4)",
        "expert activation rate per category (MoE test tokens routed to the expert; rows sum to k):",
    ]
    rates = results["moe-8c4"]["expert_rates"]
    for cat, row in rates.items():
        extra.append(f"  {cat:8s}" + "".join(f"{v:6.2f}" for v in row))
    report = f"{table}\n" + "\n".join(extra)
    print("\n" + report)
    (out / "table.txt").write_text(report + "\n")
    png = out / "demo.png"
    plot(results, logs, png)
    print(f"\nplot: {png}\nresults: {out}/<adapter>/eval.json; total {time.perf_counter() - t0:.0f} s", flush=True)
    return {"results": results, "summaries": summaries, "report": report}


def plot(results: dict, logs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    cats = sorted({c for r in results.values() for c in r["mmau"]["per_category"]})
    labels = [*cats, "knowledge\n(audio)", "knowledge\n(text)"]
    x = np.arange(len(labels))
    for i, n in enumerate(names):
        r = results[n]
        vals = [r["mmau"]["per_category"].get(c, 0) for c in cats]
        vb = r.get("voicebench", {})
        vals += [vb.get("audio", {}).get("accuracy", 0), vb.get("text", {}).get("accuracy", 0)]
        axes[0].bar(x + (i - 0.5) * 0.38, [100 * v for v in vals], 0.38, label=n)
    axes[0].set_xticks(x, labels, fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("test accuracy")
    axes[0].legend()
    rates = results.get("moe-8c4", {}).get("expert_rates", {})
    if rates:
        mat = np.array([rates[c] for c in rates])
        im = axes[1].imshow(mat, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)  # the rate's full range
        for (i, j), v in np.ndenumerate(mat):
            axes[1].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        axes[1].set_yticks(range(len(rates)), list(rates))
        axes[1].set_xticks(range(mat.shape[1]), [f"e{e}" for e in range(mat.shape[1])])
        axes[1].set_title("MoE expert activation rate per category")
        fig.colorbar(im, ax=axes[1])
    for n in names:
        steps = [r["step"] for r in logs[n] if "ntp" in r]
        axes[2].plot(steps, [r["ntp"] for r in logs[n] if "ntp" in r], label=f"{n} train", alpha=0.7)
        ev = [(r["step"], r["val_loss"]) for r in logs[n] if "val_loss" in r and not r.get("final")]
        if ev:
            axes[2].plot(*zip(*ev, strict=True), "o--", label=f"{n} val")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_title("next-token loss on answers")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="folder for both training runs, the table and the plot")
    p.add_argument("--corpus", default="data/corpus-demo", help="corpus folder (built once, then reused)")
    p.add_argument("--size", choices=sorted(SIZES), default="demo", help="corpus size (items per task)")
    p.add_argument("--train-per-task", type=int, help="override the corpus size's training items per task")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per adapter (same budget for both)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (Warmup-Stable-Decay)")
    p.add_argument("--audio-dim", type=int, default=64, help="d, the adapter input width (paper: 2560)")
    p.add_argument("--semantic-codes", type=int, default=64, help="k-means codebook of the discrete stream (0: off)")
    p.add_argument("--llm-hidden", type=int, default=128, help="hidden size of the small random Qwen3")
    p.add_argument("--llm-layers", type=int, default=2, help="decoder layers of the small random Qwen3")
    p.add_argument("--aux-lambda", type=float, default=0.01, help="weight of the MoE balance loss")
    p.add_argument("--text-weight", type=int, default=4, help="repeats of the text-knowledge questions per epoch")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus, weights and data order")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
