"""The paper's experiments end to end at a chosen size, as one markdown report with figures.

    python -m adapter.lalm.studies.report --out runs/report --report-dir runs/report/report
    python -m adapter.lalm.studies.report --steps 300 --audio-dim 32 ...     # smaller and faster

1. Trains the dense adapter and every Table 2/3 preset on the same corpus, seed and budget
   (adapter.lalm.studies.ablation) and evaluates them on the test split (Tables 1-3).
2. Expert activation heatmaps on the test split, with and without the balance loss (Fig. 3).
3. Gradient cosine similarity between categories at every kept checkpoint of dense and MoE (Fig. 4).
4. Gradient influence scores at the end of training, dense and MoE (Fig. 5).
5. Training curves of dense and both MoE layouts (adapter.lalm.studies.curves).
6. Writes report.md (tables, figures, the paper's claims checked one by one), report.json and the PNGs.

Accuracy differences come with their binomial standard error, and a claim is called reproduced only
when the difference has the paper's sign and exceeds two standard errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from adapter.cli import run_cli
from adapter.environment import environment
from adapter.lalm.data import read_manifest
from adapter.lalm.encoder import ENCODER_PRESETS, PRETRAINED_ENCODERS
from adapter.lalm.studies.ablation import TABLE_2_3, ablation_table, run_ablation
from adapter.lalm.studies.analysis import CATEGORIES, analyze_run, write_figures
from adapter.lalm.studies.curves import plot_runs, read_run
from adapter.lalm.studies.experiment import ExperimentConfig, add_experiment_args, experiment_from_args

PRESETS = ("dense", "moe-8c4-matched", "moe-8c4-parallel", *TABLE_2_3)
"""Dense, then the MoE adapter at dense's total size in both readings of Table 4 (serial with
wider experts, parallel), then Table 2/3's presets as the paper sized them."""
HEATMAPS = ("moe-8c4", "moe-8c4-no-ebl", "moe-8c4-parallel")
CURVES = ("dense", "moe-8c4", "moe-8c4-parallel")
"""The runs whose training curves the report draws: dense and both readings of Table 4."""
"""Fig. 3 with and without the balance loss, and the recommended preset's routing."""


# ------------------------------------------------------------------------------ comparisons


def encoder_words(name: str) -> str:
    """How the setup names an encoder: pretrained, random preset or a file."""
    if name in PRETRAINED_ENCODERS:
        return f"OpenAI's pretrained Whisper {name} encoder"
    if name in ENCODER_PRESETS:
        return f"random '{name}' Whisper encoder"
    return f"Whisper encoder from {name}"


def diff_se(a: float, b: float, n: int) -> tuple[float, float]:
    """a - b and the standard error of that difference of two accuracies on n items each."""
    se = math.sqrt(max(a * (1 - a) + b * (1 - b), 1e-12) / max(n, 1))
    return a - b, se


def verdict(delta: float, se: float, paper_sign: int) -> str:
    """'agrees' (paper's sign, > 2 SE), 'disagrees' (opposite sign, > 2 SE) or 'within noise'."""
    if abs(delta) <= 2 * se:
        return "within noise (diff <= 2 SE)"
    return "agrees" if (delta > 0) == (paper_sign > 0) else "disagrees"


def sign_verdict(value: float, paper_sign: int) -> str:
    if value == 0 or math.isnan(value):
        return "zero / undefined"
    return "agrees" if (value > 0) == (paper_sign > 0) else "disagrees"


def _pp(v: float) -> str:
    return f"{100 * v:+.1f} pp"


def accuracy_claims(rows: dict[str, dict], n_mmau: int, n_know: int) -> list[list[str]]:
    """Tables 1-3 claims as rows [claim, paper, here, verdict]."""
    out = []

    def compare(claim, paper, a, b, metric, sign):
        if a not in rows or b not in rows:
            return
        n = n_mmau if metric == "mmau" else n_know
        va = rows[a]["mmau"]["all"] if metric == "mmau" else rows[a]["knowledge_audio"]
        vb = rows[b]["mmau"]["all"] if metric == "mmau" else rows[b]["knowledge_audio"]
        if va is None or vb is None:
            return
        d, se = diff_se(va, vb, n)
        out.append([claim, paper, f"{_pp(d)} (SE {100 * se:.1f})", verdict(d, se, sign)])

    compare("T1: MoE beats dense on MMAU", "+1.71", "moe-8c4", "dense", "mmau", +1)
    compare("T1: MoE beats dense on knowledge (audio)", "+3.16 MMSU, +3.75 OBQA", "moe-8c4", "dense", "know", +1)
    for name, reading in (("moe-8c4-matched", "serial"), ("moe-8c4-parallel", "parallel")):
        compare(f"T1 at dense's size ({reading}): {name} beats dense on MMAU", "+1.71", name, "dense", "mmau", +1)
    if rows["moe-8c4"]["modality_gap"] is not None and rows["dense"]["modality_gap"] is not None:
        d, se = diff_se(rows["moe-8c4"]["knowledge_audio"], rows["dense"]["knowledge_audio"], n_know)
        gd = rows["moe-8c4"]["modality_gap"] - rows["dense"]["modality_gap"]
        out.append(["T1: MoE narrows the modality gap", "+3.16 MMSU, +3.75 OBQA", _pp(gd), verdict(gd, se, +1)])
    for other, paper_mmau, paper_know in (
        ("moe-16c4", "-0.70", "-3.42 / -5.50"),
        ("moe-8c1", "-1.61", "-5.24 / -9.90"),
        ("moe-4c2", "-0.40", "-0.07 / -1.11"),
        ("moe-8c4-half-f", "-0.90", "-0.91 / +0.87"),
        ("moe-8c4-double-f", "-1.81", "-2.25 / -3.31"),
    ):
        compare(f"T2: {other} below 8c4 on MMAU", paper_mmau, other, "moe-8c4", "mmau", -1)
        compare(f"T2: {other} below 8c4 on knowledge", paper_know, other, "moe-8c4", "know", -1)
    compare("T3: w/o EBL higher on MMAU", "+1.51", "moe-8c4-no-ebl", "moe-8c4", "mmau", +1)
    compare("T3: w/o EBL lower on knowledge", "-0.82 / -1.54", "moe-8c4-no-ebl", "moe-8c4", "know", -1)
    return out


def load_spread(rates: dict[str, list[float]], tokens: dict[str, int]) -> float:
    """Coefficient of variation of the experts' overall load (0: perfectly balanced), the categories'
    rates weighted by their token counts."""
    weights = {c: max(tokens.get(c, 0), 1) for c in rates}
    total = sum(weights.values())
    E = len(next(iter(rates.values())))
    load = [sum(rates[c][e] * weights[c] for c in rates) / total for e in range(E)]
    mean = sum(load) / E
    return math.sqrt(sum((v - mean) ** 2 for v in load) / E) / mean if mean else float("nan")


def specialization(rates: dict[str, list[float]]) -> dict:
    """Per expert: the category it serves most and how much more than the mean over categories
    (1.0: no preference). 'Dominated' experts have a ratio >= 1.5; a 'speech+music' expert has both
    speech and music above its mean rate and sound below it (the paper says none exists)."""
    cats = [c for c in CATEGORIES if c in rates]
    E = len(rates[cats[0]])
    experts = []
    for e in range(E):
        col = {c: rates[c][e] for c in cats}
        mean = sum(col.values()) / len(col)
        top = max(col, key=col.get)
        experts.append({"expert": e, "top": top, "ratio": col[top] / mean if mean else float("nan"), **col})
    both = [
        x["expert"]
        for x in experts
        if {"speech", "music", "sound"} <= set(cats)
        and x["speech"] > (m := sum(x[c] for c in cats) / len(cats))
        and x["music"] > m
        and x["sound"] < m
    ]
    return {
        "experts": experts,
        "dominated": [x["expert"] for x in experts if x["ratio"] >= 1.5],
        "speech_and_music": both,
    }


def heatmap_claims(analysis: dict[str, dict], tokens: dict[str, int]) -> list[list[str]]:
    """Fig. 3 claims as rows [claim, paper, here, verdict]."""
    out = []
    with_ebl, without = analysis.get("moe-8c4", {}).get("heatmap"), analysis.get("moe-8c4-no-ebl", {}).get("heatmap")
    if with_ebl and without:
        a, b = load_spread(with_ebl, tokens), load_spread(without, tokens)
        out.append(
            [
                "F3: the balance loss keeps expert loads balanced",
                "w/o EBL concentrates on dominant experts",
                f"load spread {a:.3f} with, {b:.3f} without",
                sign_verdict(b - a, +1),
            ]
        )
    if with_ebl:
        spec = specialization(with_ebl)
        top = max(x["ratio"] for x in spec["experts"])
        out.append(
            [
                "F3: some experts serve mainly one category",
                "yes (Fig. 3)",
                f"{len(spec['dominated'])} experts with ratio >= 1.5 (max {top:.2f})",
                "agrees" if spec["dominated"] else "disagrees",
            ]
        )
        out.append(
            [
                "F3: no expert specialized for speech and music but not sound",
                "none",
                str(spec["speech_and_music"] or "none"),
                "agrees" if not spec["speech_and_music"] else "disagrees",
            ]
        )
    return out


def gradient_claims(analysis: dict[str, dict]) -> list[list[str]]:
    """Fig. 4 / Fig. 5 claims as rows [claim, paper, here, verdict]."""
    out = []
    dense, moe = analysis.get("dense", {}), analysis.get("moe-8c4", {})
    if dense.get("cosine") and moe.get("cosine"):
        names = dense["cosine"][-1]["names"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                pair = f"{names[i]}-{names[j]}"
                dc = [t["cosine"][i][j] for t in dense["cosine"]]
                mc = [t["cosine"][i][j] for t in moe["cosine"]]
                d_mean, m_mean = sum(dc) / len(dc), sum(mc) / len(mc)
                out.append(
                    [f"F4: dense gradients conflict ({pair})", "negative", f"{d_mean:+.3f}", sign_verdict(d_mean, -1)]
                )
                out.append(
                    [
                        f"F4: MoE more aligned than dense ({pair})",
                        "higher (music-speech +0.023)",
                        f"{m_mean:+.3f} vs {d_mean:+.3f}",
                        sign_verdict(m_mean - d_mean, +1),
                    ]
                )
    if dense.get("influence") and moe.get("influence"):
        names = dense["influence"]["names"]
        idx = {c: k for k, c in enumerate(names)}
        for target in ("music", "sound"):
            if "speech" in idx and target in idx:
                i, j = idx[target], idx["speech"]
                dv, mv = dense["influence"]["score"][i][j], moe["influence"]["score"][i][j]
                out.append([f"F5: dense: a speech step hurts {target}", "negative", f"{dv:+.3f}", sign_verdict(dv, -1)])
                out.append([f"F5: MoE: a speech step helps {target}", "positive", f"{mv:+.3f}", sign_verdict(mv, +1)])
        off = lambda m: [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]  # noqa: E731
        d_off, m_off = off(dense["influence"]["score"]), off(moe["influence"]["score"])
        out.append(
            [
                "F5: MoE off-diagonal influence above dense's (mean)",
                "dense negative, MoE positive",
                f"{sum(m_off) / len(m_off):+.3f} vs {sum(d_off) / len(d_off):+.3f}",
                sign_verdict(sum(m_off) / len(m_off) - sum(d_off) / len(d_off), +1),
            ]
        )
    return out


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def _matrix_md(names: list[str], mat: list[list[float]]) -> str:
    return _md_table(["", *names], [[n, *[f"{v:+.3f}" for v in row]] for n, row in zip(names, mat, strict=True)])


# ------------------------------------------------------------------------------ report


def write_report(exp: ExperimentConfig, rows: list[dict], analysis: dict, info: dict, seconds: float, out: Path) -> str:
    model = exp.run.model
    by = {r["preset"]: r for r in rows}
    test = read_manifest(Path(exp.corpus) / "test.jsonl")
    n_mmau = sum(1 for ex in test if ex.eval == "mmau")
    n_know = sum(1 for ex in test if ex.eval == "voicebench")
    tokens = {c: 0 for c in CATEGORIES}
    for ex in test:
        if ex.category in tokens and ex.audio is not None:
            tokens[ex.category] += ex.num_frames
    claims = accuracy_claims(by, n_mmau, n_know) + heatmap_claims(analysis, tokens) + gradient_claims(analysis)
    lines = [
        "# MoE-Adapter paper analyses, reproduced at a small size",
        "",
        f"Generated by `python -m adapter.lalm.studies.report` on {info['date']} (git {info['git_sha']}).",
        f"Device: {info['device']} ({info['device_detail']}); torch {info['torch']}, triton {info['triton']}, "
        f"transformers {info['transformers']}, Python {info['python']}. Training wall time "
        f"{sum(r['train_seconds'] for r in rows) / 60:.0f} min over {len(rows)} adapters; this invocation "
        f"{seconds / 60:.0f} min.",
        "",
        "## Setup",
        f"- Corpus `{exp.size}` (adapter.lalm.corpus: speech, music and sound, 12 tasks), seed {exp.run.seed}; "
        f"test split: {n_mmau} MMAU-style items and {n_know} spoken knowledge questions.",
        f"- Model: {encoder_words(model.encoder)} (frozen), d = {model.audio_dim}, a {model.tiny_llm_layers}-layer "
        f"random Qwen3 of hidden {model.tiny_llm_hidden} (trained), semantic codebook {model.semantic_codes}.",
        f"- Every adapter: {exp.run.max_steps} steps of {exp.run.max_batch_size} examples, peak lr {exp.run.lr}, WSD, "
        f"balance-loss weight {exp.run.aux_lambda}, the same data order.",
        "- Paper: Qwen3-1.7B, d = 2560, 40B tokens. This run is about 10^5 times smaller; its numbers test "
        "the tools and show what this size can and cannot resolve, not the paper's values.",
        "",
        "## Tables 1-3: adapters on the same data and budget",
        "",
        ablation_table(rows),
        "",
        "![accuracy per adapter](ablation.png)",
        "",
        "Accuracy is in %; `gap` = knowledge accuracy as audio minus as text (the paper's modality gap). "
        "`params` count this run's adapters; `params @ paper d` the same preset at d = 2560, D = 2048. "
        "`train s` is wall time on a machine that may have run other work meanwhile: not a speed benchmark "
        "(benchmarks/ is).",
        "",
        "## Figure 3: expert activation per category (test split)",
        "",
        "![expert heatmaps](heatmap.png)",
        "",
    ]
    for name in HEATMAPS:
        rates = analysis.get(name, {}).get("heatmap")
        if not rates:
            continue
        spec = specialization(rates)
        cats = [c for c in CATEGORIES if c in rates]
        lines += [
            f"**{name}** (rows sum to k; load spread = coefficient of variation of the overall expert load, "
            f"0 is balanced: {load_spread(rates, tokens):.3f})",
            "",
            _md_table(
                ["expert", *cats, "serves most", "ratio to mean"],
                [
                    [f"e{x['expert']}", *[f"{x[c]:.2f}" for c in cats], x["top"], f"{x['ratio']:.2f}"]
                    for x in spec["experts"]
                ],
            ),
            "",
            f"Experts dominated by one category (ratio >= 1.5): {spec['dominated'] or 'none'}; experts "
            f"specialized for speech and music but not sound: {spec['speech_and_music'] or 'none'}.",
            "",
        ]
    lines += ["## Figure 4: gradient cosine similarity between categories", "", "![gradient cosine](cosine.png)", ""]
    for name in ("dense", "moe-8c4"):
        track = analysis.get(name, {}).get("cosine")
        if track:
            norms = ", ".join(f"{c} {v:.3g}" for c, v in track[-1]["grad_norm"].items())
            lines += [
                f"**{name}**, last checkpoint (step {track[-1]['step']}); gradient norms: {norms}",
                "",
                _matrix_md(track[-1]["names"], track[-1]["cosine"]),
                "",
            ]
    norms = {
        n: analysis[n]["cosine"][-1]["grad_norm"] for n in ("dense", "moe-8c4") if analysis.get(n, {}).get("cosine")
    }
    if norms:
        ratios = {n: max(v.values()) / max(min(v.values()), 1e-30) for n, v in norms.items()}
        lines += [
            "At the last checkpoint the categories' gradient norms differ by up to "
            + ", ".join(f"{r:.0f}x ({n})" for n, r in ratios.items())
            + ": a category whose answers are already learned has a small, noisy gradient, and its cosines "
            "say little. The plot shows the whole track.",
            "",
        ]
    lines += ["## Figure 5: gradient influence I_ij (row i: loss of; column j: step on)", ""]
    lines += ["![gradient influence](influence.png)", ""]
    for name in ("dense", "moe-8c4"):
        inf = analysis.get(name, {}).get("influence")
        if inf:
            lines += [
                f"**{name}** (step size lambda = {inf['step_size']})",
                "",
                _matrix_md(inf["names"], inf["score"]),
                "",
            ]
    lines += [
        "## Training curves",
        "",
        f"{', '.join(CURVES)}: loss, learning rate, gradient norm (skipped steps marked), balance loss against k, "
        "the busiest and idlest expert's load x E, throughput "
        "(`python -m adapter.lalm.studies.curves` draws any runs).",
        "",
        "![training curves](curves.png)",
        "",
        "## The paper's claims, one by one",
        "",
        "An accuracy claim is *reproduced* when the difference has the paper's sign and exceeds two "
        "binomial standard errors (SE); gradient claims are compared by sign (means over checkpoints for "
        "Fig. 4, over batches for Fig. 5).",
        "",
        _md_table(["claim", "paper", "here", "verdict"], claims),
        "",
        f"Agrees: {sum(c[3] == 'agrees' for c in claims)}, disagrees: {sum(c[3] == 'disagrees' for c in claims)}, "
        f"within noise or undefined: {sum(c[3] not in ('agrees', 'disagrees') for c in claims)} of {len(claims)}.",
        "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps(
            {
                "environment": info,
                "experiment": dataclasses.asdict(exp),
                "rows": rows,
                "analysis": analysis,
                "claims": claims,
            },
            indent=1,
        )
    )
    return text


def run_report(exp: ExperimentConfig, report_dir: Path, *, num_batches: int, batch_size: int, step_size: float) -> str:
    t0 = time.perf_counter()
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = run_ablation(exp, PRESETS)
    out = Path(exp.out)
    val = read_manifest(Path(exp.corpus) / "val.jsonl")
    test = read_manifest(Path(exp.corpus) / "test.jsonl")
    common = dict(
        batch_size=batch_size, num_batches=num_batches, step_size=step_size, seed=exp.run.seed, progress=not exp.quiet
    )
    analysis = {}
    for name in ("dense", "moe-8c4"):
        analysis[name] = analyze_run(out / name, val, analyses=("cosine", "influence"), **common)
    for name in HEATMAPS:
        analysis.setdefault(name, {})["heatmap"] = analyze_run(out / name, test, analyses=("heatmap",), **common)[
            "heatmap"
        ]
    write_figures(analysis, report_dir)
    plot_runs([read_run(out / name) for name in CURVES], report_dir / "curves.png")
    info = environment("cuda" if torch.cuda.is_available() else "cpu")
    text = write_report(exp, rows, analysis, info, time.perf_counter() - t0, report_dir)
    for extra in ("ablation.md", "ablation.json", "ablation.png"):  # run_ablation wrote them
        shutil.copy(out / extra, report_dir / extra)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--report-dir", type=Path, help="where report.md, report.json and the PNGs go (default: <out>/report)"
    )
    p.add_argument("--num-batches", type=int, default=4, help="batches per category for the gradient analyses")
    p.add_argument("--grad-batch-size", type=int, default=10, help="examples per category batch (gradient analyses)")
    p.add_argument("--step-size", type=float, default=1e-2, help="lambda of the influence score (eq. 12)")
    add_experiment_args(p, out="runs/report", checkpoints=8)
    args = p.parse_args(argv)
    exp = experiment_from_args(args)
    report_dir = args.report_dir or Path(exp.out) / "report"
    run_report(exp, report_dir, num_batches=args.num_batches, batch_size=args.grad_batch_size, step_size=args.step_size)
    print(f"wrote {report_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
