"""Ablation runner (paper Tables 2 and 3): train adapter presets on the same corpus, order, seed
and step budget, evaluate each on the test split, and write one comparison table.

    python -m adapter.lalm.studies.ablation --out runs/ablation                  # Table 2 + 3 presets
    python -m adapter.lalm.studies.ablation --presets dense moe-8c4 moe-8c1 --steps 300

Writes <out>/ablation.md (markdown table), <out>/ablation.json (every number) and
<out>/ablation.png; each preset's run (checkpoints, log, eval.json) in <out>/<preset>/.
"""

from __future__ import annotations

import argparse
import json
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
from adapter.presets import PRESETS, preset

TABLE_2_3 = (
    "moe-8c4",
    "moe-16c4",
    "moe-8c1",
    "moe-4c2",
    "moe-8c4-half-f",
    "moe-8c4-double-f",
    "moe-8c4-no-ebl",
)
"""The default row first, then Table 2's expert configurations and widths, then Table 3's w/o EBL."""


def describe(name: str, audio_dim: int, llm_hidden: int) -> dict:
    """Shape and parameter counts of a preset as the experiment builds it (d = audio_dim in, the
    LLM's hidden size out) and at the paper's sizes."""
    small, paper = preset(name, audio_dim, llm_hidden), preset(name)
    row = {"experts": getattr(small, "num_experts", 0), "top_k": getattr(small, "top_k", 0)}
    row["width"] = getattr(small, "expert_dim", getattr(small, "hidden_dim", 0))
    row["params"] = small.param_counts().total
    row["active"] = small.param_counts().active
    row["paper_params"] = paper.param_counts().total
    row["paper_active"] = paper.param_counts().active
    return row


def summarize(name: str, run: dict, audio_dim: int, llm_hidden: int) -> dict:
    """One table row: the preset's shape and its measured scores."""
    ev = run["eval"]
    final = [r for r in run["log"] if r.get("final")]
    aux = [r["aux"] for r in run["log"] if r.get("aux") is not None][-10:]  # unweighted L_aux
    vb = ev.get("voicebench", {})
    return {
        "preset": name,
        **describe(name, audio_dim, llm_hidden),
        "mmau": {**ev["mmau"]["per_category"], "all": ev["mmau"]["overall"]},
        "knowledge_audio": vb.get("audio", {}).get("accuracy"),
        "knowledge_text": vb.get("text", {}).get("accuracy"),
        "modality_gap": vb.get("modality_gap"),
        "val_loss": final[-1]["val_loss"] if final else None,
        "aux": sum(aux) / len(aux) if aux else None,
        "train_seconds": run["seconds"],
        "expert_rates": ev.get("expert_rates", {}),
    }


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ablation_table(rows: list[dict]) -> str:
    """Markdown: shape, parameters (here and at the paper's d = 2560), accuracies, losses."""
    cats = sorted({c for r in rows for c in r["mmau"] if c != "all"})
    head = (
        ["preset", "E", "k", "width", "params", "active", "params @ paper d"]
        + [f"MMAU {c}" for c in cats]
        + ["MMAU all", "know. audio", "know. text", "gap", "val loss", "L_aux", "train s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["preset"],
            str(r["experts"] or "-"),
            str(r["top_k"] or "-"),
            str(r["width"]),
            f"{r['params'] / 1e3:.0f}k",
            f"{r['active'] / 1e3:.0f}k",
            f"{r['paper_params'] / 1e6:.1f}M / {r['paper_active'] / 1e6:.1f}M",
            *[_pct(r["mmau"].get(c)) for c in cats],
            _pct(r["mmau"]["all"]),
            _pct(r["knowledge_audio"]),
            _pct(r["knowledge_text"]),
            _pct(r["modality_gap"]),
            "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}",
            "-" if r["aux"] is None else f"{r['aux']:.3f}",
            f"{r['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(rows: list[dict], path: Path) -> None:
    """Grouped bars: MMAU-style accuracy per category and overall, and knowledge-as-audio, per preset."""
    plt = pyplot()
    import numpy as np

    cats = sorted({c for r in rows for c in r["mmau"] if c != "all"})
    metrics = [*[f"MMAU {c}" for c in cats], "MMAU all", "knowledge audio"]
    values = [[r["mmau"].get(c) for c in cats] + [r["mmau"]["all"], r["knowledge_audio"]] for r in rows]
    x = np.arange(len(metrics))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(metrics) + 0.4 * len(rows)), 4))
    for i, (r, vals) in enumerate(zip(rows, values, strict=True)):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [100 * (v or 0) for v in vals], width, label=r["preset"])
    ax.set_xticks(x, metrics)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("adapters trained on the same data and budget")
    save(fig, path)


def run_ablation(exp: ExperimentConfig, presets=TABLE_2_3) -> list[dict]:
    """Train and evaluate every preset; write ablation.md / .json / .png under exp.out."""
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    manifests = exp.build_corpus()
    model = exp.run.model
    rows = [
        summarize(p, train_and_evaluate(exp, p, manifests), model.audio_dim, model.tiny_llm_hidden) for p in presets
    ]
    out = Path(exp.out)
    (out / "ablation.md").write_text(ablation_table(rows) + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    plot_ablation(rows, out / "ablation.png")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", default=list(TABLE_2_3), help=f"adapter presets: {', '.join(PRESETS)}")
    add_experiment_args(p, out="runs/ablation")
    args = p.parse_args(argv)
    rows = run_ablation(experiment_from_args(args), args.presets)
    print(ablation_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
