"""Interference between audio categories in one adapter: does training on speech, music and sound
together cost a category the accuracy it reaches when the adapter is trained on it alone?

    python -m adapter.lalm.studies.interference --presets dense --seeds 0 1 2 --test-per-task 100

The paper's argument for an MoE adapter rests on it: a dense adapter's categories pull its weights
apart (gradient conflict), experts let them not. If a category is not worse jointly than alone,
there is no interference for routing to remove, and no MoE gain can come from it.

Design, per seed (each seed its own corpus) and preset:
- one run on each category alone (its MMAU-style tasks) and one run on the three together;
- every run passes over its training items the same number of times (--epochs): a category gets
  the same training alone as inside the joint run, whose steps are the sum of the three;
- text knowledge and the spoken-knowledge task are left out: they train the LLM's knowledge, not
  the adapter's mapping of audio;
- each run is evaluated on the test items of the categories it trained on, and alone - joint is
  taken per category on the same items (paired), pooled over seeds (items resampled within each
  seed: adapter/lalm/studies/paired.py), under both scorings (generated answer; log-likelihood of each
  option).

Control (--alone-steps joint): each category also trains alone for as many steps as the joint
run, so the shared LLM, which trains with the adapter, gets the same number of updates alone and
jointly (a category then passes over its own items about 3.7 times as often): whatever joint
training still adds is not the LLM's longer training. These runs are <category>-equal-steps.

Decision, fixed here before any run (RULE): a category shows interference when the 95% paired
interval of alone - joint under log-likelihood scoring lies above 0, transfer (joint helps) when it
lies below, neither otherwise. The generated-answer scoring is reported beside it.

Runs land in <out>/seed-<s>/<preset>/<setting>/; with --resume a finished, evaluated run is reused
(its configuration checked) and an interrupted one continues from its checkpoint. Writes
<out>/interference.md, interference.json and interference.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from adapter.cli import run_cli
from adapter.files import atomic_write_text
from adapter.lalm.model import AUDIO_CATEGORIES
from adapter.lalm.plots import pyplot, save
from adapter.lalm.studies.experiment import (
    ExperimentConfig,
    add_experiment_args,
    experiment_from_args,
    train_and_evaluate,
)
from adapter.lalm.studies.paired import PairedDiff, aligned, paired_difference
from adapter.presets import PRESETS

CATEGORIES = AUDIO_CATEGORIES
SETTINGS = (*CATEGORIES, "joint")
EQUAL_STEPS = "equal-steps"  # suffix of the alone runs that train as many steps as the joint run
PRIMARY = "correct_ll"  # log-likelihood scoring decides: it never fails to parse and does not depend on decoding
SCORINGS = {"correct_ll": "log-likelihood", "correct": "generated answer"}
RULE = (
    "interference: the 95% paired interval of alone - joint (log-likelihood scoring) lies above 0; "
    "transfer: it lies below 0; neither: it contains 0"
)


def category_manifests(manifests: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """{setting: {"train", "val", "test"}}: the corpus's MMAU-style items of each category, and of
    all three ("joint"), written beside the corpus manifests (audio paths stay relative to them,
    and the runs share the corpus's feature cache)."""
    root = Path(manifests["train"]).parent
    out: dict[str, dict[str, Path]] = {s: {} for s in SETTINGS}
    for split in ("train", "val", "test"):
        records = [json.loads(x) for x in Path(manifests[split]).read_text().splitlines() if x.strip()]
        records = [r for r in records if r.get("eval", "mmau") == "mmau" and r.get("category") in CATEGORIES]
        for setting in SETTINGS:
            keep = [r for r in records if setting == "joint" or r["category"] == setting]
            if not keep:
                raise ValueError(f"{manifests[split]} holds no MMAU-style {setting} items")
            path = root / f"interference-{setting}-{split}.jsonl"
            text = "".join(json.dumps(r) + "\n" for r in keep)
            if not path.is_file() or path.read_text() != text:
                atomic_write_text(path, text)
            out[setting][split] = path
    return out


def steps_for(n_train: int, epochs: float, batch_size: int) -> int:
    """Optimizer steps that pass over n_train items `epochs` times at batch_size per step."""
    return max(1, math.ceil(epochs * n_train / batch_size))


def run_interference(
    exp: ExperimentConfig, presets: list[str], seeds: list[int], epochs: float, equal_steps: bool = False
) -> dict[int, dict[str, dict[str, dict]]]:
    """{seed: {preset: {setting: {"eval", "steps", "seconds"}}}}, training what is not there yet;
    with equal_steps also the <category>-equal-steps runs (see the module docstring)."""
    results: dict[int, dict[str, dict[str, dict]]] = {}
    total = len(seeds) * len(presets) * (len(SETTINGS) + (len(CATEGORIES) if equal_steps else 0))
    done = 0
    for seed in seeds:
        base = exp.with_(seed=seed, corpus=str(Path(exp.corpus) / f"seed-{seed}"))
        per_setting = category_manifests(base.build_corpus())
        n_train = {s: sum(1 for x in m["train"].read_text().splitlines() if x.strip()) for s, m in per_setting.items()}
        runs = [(s, s, steps_for(n_train[s], epochs, exp.run.max_batch_size)) for s in SETTINGS]
        if equal_steps:
            joint_steps = steps_for(n_train["joint"], epochs, exp.run.max_batch_size)
            runs += [(f"{c}-{EQUAL_STEPS}", c, joint_steps) for c in CATEGORIES]
        results[seed] = {}
        for preset in presets:
            results[seed][preset] = {}
            for setting, data, steps in runs:
                manifests = per_setting[data]
                run_exp = base.with_(max_steps=steps, out=str(Path(exp.out) / f"seed-{seed}" / preset))
                done += 1
                print(
                    f"[{done}/{total}] seed {seed} {preset} {setting}: {n_train[data]} items, {steps} steps", flush=True
                )
                t0 = time.perf_counter()
                out = train_and_evaluate(run_exp, preset, manifests, name=setting)
                results[seed][preset][setting] = {
                    "eval": out["eval"],
                    "steps": steps,
                    "seconds": out["seconds"],
                    "wall": time.perf_counter() - t0,
                }
    return results


def _diff(results, preset: str, category: str, key: str, alone: str = "") -> PairedDiff:
    a, b = [], []
    for seed in sorted(results):
        runs = results[seed][preset]
        x, y = aligned(
            runs[alone or category]["eval"]["predictions"],
            runs["joint"]["eval"]["predictions"],
            key,
            keep=lambda r: r["category"] == category,
        )
        a.append(x)
        b.append(y)
    return paired_difference(a, b)


def verdict(d: PairedDiff) -> str:
    return "interference" if d.low > 0 else ("transfer" if d.high < 0 else "neither")


def _rows(results: dict, p: str, seeds: list[int], suffix: str = "") -> dict:
    """Per category and scoring: alone (the run <category><suffix>) - joint."""
    rows = {}
    for c in CATEGORIES:
        alone_run, row = c + suffix, {}
        for key in SCORINGS:
            table = "mmau_ll" if key == "correct_ll" else "mmau"
            d = _diff(results, p, c, key, alone_run)
            row[key] = {
                **dataclasses.asdict(d),
                "alone": [results[s][p][alone_run]["eval"][table]["per_category"][c] for s in seeds],
                "joint": [results[s][p]["joint"]["eval"][table]["per_category"][c] for s in seeds],
                "verdict": verdict(d),
            }
        rows[c] = row
    return rows


def summarize(results: dict, presets: list[str]) -> dict:
    """Per preset: alone - joint per category ("categories"), and with the equal-steps control
    where every seed has it ("equal_steps")."""
    seeds = sorted(results)
    out: dict = {"seeds": seeds, "rule": RULE, "presets": {}}
    for p in presets:
        ran = set.intersection(*(set(results[s][p]) for s in seeds))
        out["presets"][p] = {
            "categories": _rows(results, p, seeds),
            "steps": {s: run["steps"] for s, run in results[seeds[0]][p].items() if s in ran},
            "train_seconds": sum(results[s][p][x]["seconds"] for s in seeds for x in ran),
        }
        if all(f"{c}-{EQUAL_STEPS}" in ran for c in CATEGORIES):
            out["presets"][p]["equal_steps"] = _rows(results, p, seeds, f"-{EQUAL_STEPS}")
    return out


def markdown(summary: dict, exp: ExperimentConfig, epochs: float) -> str:
    model = exp.run.model
    seeds = summary["seeds"]
    lines = [
        "# Interference between audio categories: each category alone vs all three jointly",
        "",
        f"Seeds {', '.join(map(str, seeds))} (each its own corpus); encoder {model.encoder} (frozen), "
        f"d = {model.audio_dim}, small random Qwen3 ({model.tiny_llm_layers} x {model.tiny_llm_hidden}) trained with "
        "the adapter; "
        f"{epochs:g} passes over each run's training items at {exp.run.max_batch_size} per step; MMAU-style tasks only "
        "(no text, no spoken knowledge).",
        "",
        f"Rule, fixed before the runs: {summary['rule']}.",
        "",
        "alone - joint in accuracy points, pooled over seeds, with the 95% paired-bootstrap interval (items "
        "resampled within seeds) and McNemar's exact p; per-seed accuracies alone / joint.",
        "",
    ]
    for p, s in summary["presets"].items():
        steps = ", ".join(f"{k} {v}" for k, v in s["steps"].items())
        lines += [
            f"## {p}",
            "",
            f"Steps per run: {steps}; training {s['train_seconds'] / 60:.1f} min over all its runs.",
            "",
            *_table(s["categories"]),
        ]
        if "equal_steps" in s:
            lines += ["", "Control: each category alone for the joint run's steps (the LLM as long trained):", ""]
            lines += _table(s["equal_steps"])
        for label, rows in (("equal passes", s["categories"]), ("equal steps", s.get("equal_steps"))):
            if rows is None:
                continue
            found = [c for c, row in rows.items() if row[PRIMARY]["verdict"] == "interference"]
            lines += [
                "",
                (
                    f"**{p}, alone with {label}: interference in {', '.join(found)}** (log-likelihood scoring)."
                    if found
                    else f"**{p}, alone with {label}: no category shows interference** (log-likelihood "
                    "scoring): the joint run is not measurably worse than the category alone."
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def _table(rows: dict) -> list[str]:
    lines = [
        "| category | scoring | n | alone - joint | 95% interval | McNemar p | alone per seed | joint per seed "
        "| verdict |",
        "|---|---|---:|---:|---|---:|---|---|---|",
    ]
    for c, row in rows.items():
        for key, label in SCORINGS.items():
            r = row[key]
            lines.append(
                f"| {c} | {label} | {r['n']} | {100 * r['diff']:+.1f} | [{100 * r['low']:+.1f}, "
                f"{100 * r['high']:+.1f}] | {r['p_mcnemar']:.3g} | "
                f"{' / '.join(f'{100 * v:.1f}' for v in r['alone'])} | "
                f"{' / '.join(f'{100 * v:.1f}' for v in r['joint'])} | {r['verdict'] if key == PRIMARY else ''} |"
            )
    return lines


def plot(summary: dict, path: Path) -> None:
    """alone - joint per category and preset with its interval, one panel per scoring."""
    plt = pyplot()
    presets = list(summary["presets"])
    fig, axes = plt.subplots(1, len(SCORINGS), figsize=(5 * len(SCORINGS), 3.6), sharey=True)
    width = 0.8 / len(presets)
    for ax, (key, label) in zip(axes, SCORINGS.items(), strict=True):
        for j, p in enumerate(presets):
            rows = summary["presets"][p]["categories"]
            xs = [i + (j - (len(presets) - 1) / 2) * width for i in range(len(CATEGORIES))]
            mid = [100 * rows[c][key]["diff"] for c in CATEGORIES]
            err = [
                [100 * (rows[c][key]["diff"] - rows[c][key]["low"]) for c in CATEGORIES],
                [100 * (rows[c][key]["high"] - rows[c][key]["diff"]) for c in CATEGORIES],
            ]
            ax.bar(xs, mid, width, yerr=err, capsize=3, label=p)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(CATEGORIES)), CATEGORIES)
        ax.set_title(f"alone - joint, {label}")
    axes[0].set_ylabel("accuracy points (95% paired interval)")
    axes[0].legend(fontsize=8)
    save(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.interference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", default=["dense"], help="adapter presets to measure (default: dense)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, each with its own corpus")
    p.add_argument("--epochs", type=float, default=20.0, help="passes over each run's training items (default: 20)")
    p.add_argument(
        "--alone-steps",
        choices=["passes", "joint"],
        default="passes",
        help="passes: alone runs pass over their items --epochs times (default); joint: also the control "
        "runs that train each category alone for the joint run's steps",
    )
    add_experiment_args(p, out="runs/interference", corpus="data/corpus-interference", test_per_task=100)
    args = p.parse_args(argv)
    unknown = [x for x in args.presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    if not args.epochs > 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    exp = experiment_from_args(args)
    results = run_interference(exp, args.presets, args.seeds, args.epochs, equal_steps=args.alone_steps == "joint")
    summary = summarize(results, args.presets)
    out = Path(exp.out)
    (out / "interference.json").write_text(json.dumps({**summary, "epochs": args.epochs}, indent=1))
    text = markdown(summary, exp, args.epochs)
    (out / "interference.md").write_text(text + "\n")
    plot(summary, out / "interference.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
