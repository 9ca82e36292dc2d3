"""Adapters compared over several seeds, with paired intervals: is an MoE preset better or worse
than the dense adapter it would replace, and by how much, beyond seed-to-seed noise?

    python -m adapter.lalm.studies.seeds --presets dense moe-8c4 moe-8c4-parallel --seeds 0 1 2 3 4

Each seed builds its own corpus (the seed draws the sentences, voices and sounds), and every
preset of a seed trains on that corpus in the same order from the same initial LLM: the presets of
one seed differ only in the adapter, so differences are taken per seed (paired) and summarized by
their mean and a 95% Student-t interval over seeds. Runs land in <out>/seed-<s>/<preset>/; a run
whose eval.json exists is reused, so an interrupted comparison continues where it stopped.
Writes <out>/seeds.md, seeds.json and seeds.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from adapter.cli import run_cli
from adapter.lalm.plots import pyplot, save
from adapter.lalm.studies.experiment import (
    ExperimentConfig,
    add_experiment_args,
    experiment_from_args,
    train_and_evaluate,
)
from adapter.lalm.training.runs import RunFolder
from adapter.presets import PRESETS


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean (low = high = mean for one value)."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, mean, mean
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def run_seeds(exp: ExperimentConfig, presets: list[str], seeds: list[int]) -> dict[int, dict[str, dict]]:
    """{seed: {preset: evaluation}}, training what is not there yet."""
    results: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        seed_exp = exp.with_(
            seed=seed, out=str(Path(exp.out) / f"seed-{seed}"), corpus=str(Path(exp.corpus) / f"seed-{seed}")
        )
        manifests = seed_exp.build_corpus()
        results[seed] = {}
        for preset in presets:
            done = RunFolder(Path(seed_exp.out) / preset).eval
            if done.is_file():
                print(f"seed {seed} {preset}: reusing {done}", flush=True)
                results[seed][preset] = json.loads(done.read_text())
            else:
                results[seed][preset] = train_and_evaluate(seed_exp, preset, manifests)["eval"]
    return results


def summarize(results: dict[int, dict[str, dict]], presets: list[str], baseline: str = "dense") -> dict:
    """Per preset: per-seed overall, per-category and per-task accuracy with their means; per MoE
    preset: the paired difference to the baseline (mean, 95% interval, per seed)."""
    seeds = sorted(results)
    out: dict = {"seeds": seeds, "presets": {}, "paired": {}}
    for p in presets:
        overall = [results[s][p]["mmau"]["overall"] for s in seeds]
        tasks = sorted({t for s in seeds for t in results[s][p]["mmau"]["per_task"]})
        cats = sorted({c for s in seeds for c in results[s][p]["mmau"]["per_category"]})
        out["presets"][p] = {
            "overall": overall,
            "overall_ci": t_interval(overall),
            "per_category": {
                c: statistics.fmean(results[s][p]["mmau"]["per_category"][c] for s in seeds) for c in cats
            },
            "per_task": {t: statistics.fmean(results[s][p]["mmau"]["per_task"][t] for s in seeds) for t in tasks},
        }
    if baseline in presets:
        for p in presets:
            if p == baseline:
                continue
            diffs = [
                a - b for a, b in zip(out["presets"][p]["overall"], out["presets"][baseline]["overall"], strict=True)
            ]
            mean, low, high = t_interval(diffs)
            verdict = "worse" if high < 0 else "better" if low > 0 else "not distinguishable"
            out["paired"][p] = {"diffs": diffs, "mean": mean, "ci": [low, high], "verdict": verdict}
    return out


def markdown(summary: dict, baseline: str = "dense") -> str:
    seeds = summary["seeds"]
    presets = list(summary["presets"])
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"MMAU-style test accuracy (%), seeds {seeds}; mean with its 95% Student-t interval over seeds.",
        "",
        "| preset | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [95% CI] |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for p in presets:
        r = summary["presets"][p]
        m, lo, hi = r["overall_ci"]
        lines.append(f"| {p} | " + " | ".join(pct(v) for v in r["overall"]) + f" | {pct(m)} [{pct(lo)}, {pct(hi)}] |")
    if summary["paired"]:
        lines += [
            "",
            f"Paired difference to {baseline} (points; the same corpus, order and LLM start per seed):",
            "",
            "| preset | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [95% CI] | verdict |",
            "|---|" + "---|" * (len(seeds) + 2),
        ]
        for p, d in summary["paired"].items():
            lines.append(
                f"| {p} | " + " | ".join(f"{100 * v:+.1f}" for v in d["diffs"])
                + f" | {100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] | {d['verdict']} |"
            )  # fmt: skip
    tasks = sorted({t for p in presets for t in summary["presets"][p]["per_task"]})
    lines += ["", "Per task, mean over seeds (%):", "", "| task | " + " | ".join(presets) + " |"]
    lines.append("|---|" + "---|" * len(presets))
    for t in tasks:
        lines.append(
            f"| {t} | " + " | ".join(pct(summary["presets"][p]["per_task"].get(t, math.nan)) for p in presets) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()

    presets = list(summary["presets"])
    fig, ax = plt.subplots(figsize=(1.8 * len(presets) + 2, 4))
    for i, p in enumerate(presets):
        r = summary["presets"][p]
        ax.scatter([i] * len(r["overall"]), [100 * v for v in r["overall"]], alpha=0.6, label=None)
        m, lo, hi = r["overall_ci"]
        ax.errorbar(i + 0.15, 100 * m, yerr=[[100 * (m - lo)], [100 * (hi - m)]], fmt="o", color="k", capsize=4)
    ax.set_xticks(range(len(presets)), presets, fontsize=8)
    ax.set_ylabel("MMAU-style accuracy (%)")
    ax.set_title(f"per seed (dots) and mean with 95% CI, seeds {summary['seeds']}")
    ax.grid(True, axis="y", alpha=0.3)
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.seeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", default=["dense", "moe-8c4", "moe-8c4-parallel"], help="adapter presets")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds (each its own corpus)")
    add_experiment_args(p, out="runs/seeds", corpus="data/corpus-seeds")
    args = p.parse_args(argv)
    unknown = [x for x in args.presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    exp = experiment_from_args(args)
    summary = summarize(run_seeds(exp, args.presets, args.seeds), args.presets)
    out = Path(exp.out)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (out / "seeds.md").write_text(text)
    plot(summary, out / "seeds.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
