"""The main job: build the heterogeneous corpus, train the reference LALM once with the dense
adapter and once with the MoE adapter on the same data and budget, evaluate both, and print a
table in the shape of the paper's Table 1 (per-category accuracy, text vs audio knowledge
accuracy and the modality gap, balance loss, expert loads), plus a plot and the runs' training
curves (adapter.lalm.studies.curves).

    python -m adapter.lalm.demo                     # CPU, a few minutes
    python -m adapter.lalm.demo --size full --steps 20000 --audio-dim 512 ...   # larger settings

Both models share everything but the adapter: encoder (OpenAI's pretrained Whisper tiny.en,
frozen, its features cached beside the corpus; `--encoder demo` for a random one), LLM (small
random Qwen3, trained), semantic stream, data order, seed, steps and learning rate. The adapters
are the paper's presets scaled to --audio-dim (dense: hidden 8d; MoE: 8 experts, top-4, f = d/2,
aggregation 4d).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adapter.cli import run_cli
from adapter.lalm.evaluate import format_table
from adapter.lalm.plots import pyplot, save
from adapter.lalm.studies.curves import plot_runs, read_run
from adapter.lalm.studies.experiment import (
    ExperimentConfig,
    add_experiment_args,
    experiment_from_args,
    train_and_evaluate,
)
from adapter.presets import RECOMMENDED_MOE

ADAPTERS = ("dense", RECOMMENDED_MOE)
"""The dense baseline and the MoE preset the README recommends in its place."""


def run_demo(exp: ExperimentConfig) -> dict:
    t0 = time.perf_counter()
    manifests = exp.build_corpus()
    print(f"corpus ready in {time.perf_counter() - t0:.0f} s: {exp.corpus}", flush=True)
    out = Path(exp.out)
    runs = {name: train_and_evaluate(exp, name, manifests) for name in ADAPTERS}
    results = {name: r["eval"] for name, r in runs.items()}
    logs = {name: r["log"] for name, r in runs.items()}
    table = format_table(results)
    moe = ADAPTERS[1]
    aux = [r["aux"] for r in logs[moe] if r.get("aux") is not None][-10:]  # unweighted L_aux
    extra = [
        f"{'balance loss L_aux (MoE)':28s}{sum(aux) / max(1, len(aux)):12.3f}  (last 10 steps; balanced: k = 4)",
        "expert activation rate per category (MoE test tokens routed to the expert; rows sum to k):",
    ]
    rates = results[moe]["expert_rates"]
    for cat, row in rates.items():
        extra.append(f"  {cat:8s}" + "".join(f"{v:6.2f}" for v in row))
    report = f"{table}\n" + "\n".join(extra)
    print("\n" + report)
    (out / "table.txt").write_text(report + "\n")
    png = out / "demo.png"
    plot(results, logs, png)
    curves = out / "curves.png"  # the training dynamics: gradient norms, L_aux, expert loads, ...
    plot_runs([read_run(out / name) for name in ADAPTERS], curves)
    print(
        f"\nplot: {png}\ntraining curves: {curves}\nresults: {out}/<adapter>/eval.json; "
        f"total {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return {"results": results, "summaries": {n: r["summary"] for n, r in runs.items()}, "report": report}


def plot(results: dict, logs: dict, path: Path) -> None:
    plt = pyplot()
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
    rates = results.get(ADAPTERS[1], {}).get("expert_rates", {})
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
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_experiment_args(p)
    exp = experiment_from_args(p.parse_args(argv))
    run_demo(exp)  # its runs pin their thread count as every runner's do (experiment.pin_threads)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
