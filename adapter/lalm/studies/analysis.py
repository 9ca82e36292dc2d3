"""The paper's section-5 analyses on trained reference-LALM runs, as JSON and PNG.

    python -m adapter.lalm.studies.analysis --runs runs/demo/dense runs/demo/moe-8c4 \\
        --manifest data/corpus-demo/val.jsonl --out runs/analysis

- heatmap    token-normalized expert activation rate per audio category (Fig. 3), MoE runs only.
- cosine     cosine similarity of the per-category gradients of the adapter's parameters
             (eq. 11, Fig. 4) at every checkpoint the run kept: how it evolves over training.
- influence  gradient influence score I_ij (eq. 12, Fig. 5) at the run's last checkpoint, averaged
             over validation batches.

A category's loss is the answer-token next-token loss (no balance loss) on a batch of that
category's audio examples; "the adapter's parameters" are `model.adapter`'s (the fusion and the LLM
are left out). The math lives in adapter/measures.py and works for any model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

from adapter.cli import run_cli
from adapter.lalm.data import Batch, Example, FeatureSource, collate, read_manifest
from adapter.lalm.evaluate import expert_rates
from adapter.lalm.model import AudioLLM
from adapter.lalm.plots import pyplot, save
from adapter.lalm.training.checkpoint import load_trained, run_features
from adapter.lalm.training.runs import checkpoint_steps
from adapter.lalm.training.setup import add_device_flag, default_device, device_from_flag
from adapter.measures import cosine_matrix, gradient_vector, influence_matrix

CATEGORIES = ("speech", "sound", "music")
ANALYSES = ("heatmap", "cosine", "influence")


def category_batches(
    model: AudioLLM,
    examples: list[Example],
    source: FeatureSource,
    *,
    categories=CATEGORIES,
    batch_size: int = 16,
    num_batches: int = 4,
    seed: int = 0,
) -> list[dict[str, Batch]]:
    """`num_batches` sets of {category: a batch of that category's audio examples}, drawn once
    from a seeded shuffle (the same for every model and checkpoint given the same examples), on
    the model's device."""
    by_cat = {c: [ex for ex in examples if ex.audio is not None and ex.category == c] for c in categories}
    empty = [c for c, exs in by_cat.items() if not exs]
    if empty:
        found = sorted({ex.category for ex in examples if ex.audio is not None})
        raise ValueError(f"no audio examples of categories {empty}; the manifest has {found}")
    rng = random.Random(seed)
    for exs in by_cat.values():
        rng.shuffle(exs)
    sets = []
    for b in range(num_batches):
        pick = {c: [exs[(b * batch_size + i) % len(exs)] for i in range(batch_size)] for c, exs in by_cat.items()}
        sets.append({c: collate(chosen, model.tokenizer, source).to(model.device) for c, chosen in pick.items()})
    return sets


def answer_loss(model: AudioLLM, batch: Batch) -> torch.Tensor:
    """Mean next-token loss over the batch's answer tokens."""
    out = model(batch)
    return out.ntp_sum / max(out.num_tokens, 1)


def gradient_cosine(model: AudioLLM, batch_sets: list[dict[str, Batch]]) -> dict:
    """Per-category gradient of the adapter (mean over the batch sets), their cosine matrix (eq. 11)."""
    model.eval()
    params = list(model.adapter.parameters())
    grads = {}
    for c in batch_sets[0]:
        grads[c] = sum(gradient_vector(answer_loss(model, s[c]), params) for s in batch_sets) / len(batch_sets)
    return {
        "names": list(grads),
        "cosine": cosine_matrix(grads).tolist(),
        "grad_norm": {c: float(g.norm()) for c, g in grads.items()},
    }


def influence_scores(model: AudioLLM, batch_sets: list[dict[str, Batch]], step_size: float) -> dict:
    """Eq. 12: the per-batch influence matrices of a normalized adapter step, averaged over batches."""
    model.eval()
    params = list(model.adapter.parameters())
    per_batch = []
    for s in batch_sets:
        losses = {c: (lambda b=b: answer_loss(model, b)) for c, b in s.items()}
        per_batch.append(influence_matrix(params, losses, step_size))
    score = torch.stack([r.score for r in per_batch]).nanmean(0)
    delta = torch.stack([r.delta for r in per_batch]).nanmean(0)
    return {"names": per_batch[0].names, "score": score.tolist(), "delta": delta.tolist(), "step_size": step_size}


def analyze_run(
    run: Path,
    examples: list[Example],
    *,
    analyses=ANALYSES,
    batch_size: int = 16,
    num_batches: int = 4,
    step_size: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict:
    """Every requested analysis of one run (see the module docstring), on `device` (default: the
    GPU when there is one)."""
    from tqdm import tqdm

    device = device or default_device()
    model = load_trained(run, device=device)
    source = run_features(run, model)
    result: dict = {"run": str(run)}
    if "heatmap" in analyses:
        result["heatmap"] = expert_rates(model, [ex for ex in examples if ex.category in CATEGORIES], source)
    sets = None
    if "influence" in analyses:
        sets = category_batches(model, examples, source, batch_size=batch_size, num_batches=num_batches, seed=seed)
        result["influence"] = influence_scores(model, sets, step_size)
    if "cosine" in analyses:
        track = []
        steps = checkpoint_steps(run)
        for step in tqdm(steps, desc=f"gradients {Path(run).name}", disable=not progress):
            m = load_trained(run, step=step, device=device)
            if sets is None:
                sets = category_batches(m, examples, source, batch_size=batch_size, num_batches=num_batches, seed=seed)
            track.append({"step": step, **gradient_cosine(m, sets)})
        result["cosine"] = track
    return result


# ------------------------------------------------------------------------------ figures


def _pairs(names: list[str]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]


def plot_heatmaps(rates: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Fig. 3: one panel per model, categories x routed experts, rates annotated."""
    plt = pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 2.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], rates.items(), strict=True):
        mat = np.array([r[c] for c in r])
        im = ax.imshow(mat, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_yticks(range(len(r)), list(r))
        ax.set_xticks(range(mat.shape[1]), [f"e{e}" for e in range(mat.shape[1])])
        ax.set_title(f"{name}: expert activation rate")
        fig.colorbar(im, ax=ax)
    save(fig, path)


def plot_cosine(tracks: dict[str, list[dict]], path: Path) -> None:
    """Fig. 4: pairwise gradient cosine per category pair over training steps, one panel per model."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(tracks), figsize=(5.5 * len(tracks), 3.6), squeeze=False, sharey=True)
    for ax, (name, track) in zip(axes[0], tracks.items(), strict=True):
        names = track[0]["names"]
        steps = [t["step"] for t in track]
        for i, j in _pairs(names):
            ax.plot(steps, [t["cosine"][i][j] for t in track], "o-", label=f"{names[i]}-{names[j]}")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_title(f"{name}: gradient cosine (eq. 11)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("cosine similarity")
    save(fig, path)


def plot_influence(influence: dict[str, dict], path: Path) -> None:
    """Fig. 5: I_ij, the effect of a step on category j (columns) on category i (rows)."""
    plt = pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, len(influence), figsize=(4.6 * len(influence), 3.6), squeeze=False)
    for ax, (name, inf) in zip(axes[0], influence.items(), strict=True):
        mat = np.array(inf["score"], dtype=float)
        lim = max(1.0, float(np.nanmax(np.abs(mat))))
        im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(inf["names"])), inf["names"])
        ax.set_yticks(range(len(inf["names"])), inf["names"])
        ax.set_xlabel("step on category j")
        ax.set_ylabel("loss of category i")
        ax.set_title(f"{name}: influence I_ij (eq. 12)")
        fig.colorbar(im, ax=ax)
    save(fig, path)


def write_figures(results: dict[str, dict], out: Path) -> list[Path]:
    """The PNGs of whatever analyses `results` ({run name: analyze_run(...)}) hold."""
    written = []
    rates = {n: r["heatmap"] for n, r in results.items() if r.get("heatmap")}
    if rates:
        plot_heatmaps(rates, out / "heatmap.png")
        written.append(out / "heatmap.png")
    tracks = {n: r["cosine"] for n, r in results.items() if r.get("cosine")}
    if tracks:
        plot_cosine(tracks, out / "cosine.png")
        written.append(out / "cosine.png")
    infl = {n: r["influence"] for n, r in results.items() if r.get("influence")}
    if infl:
        plot_influence(infl, out / "influence.png")
        written.append(out / "influence.png")
    return written


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name, or as many trailing path parts as make the names distinct
    (runs/x/dense/joint and runs/x/moe/joint -> dense/joint, moe/joint)."""
    resolved = [Path(r).resolve() for r in runs]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"a run is given twice: {[str(r) for r in runs]}")
    for depth in range(1, max(len(r.parts) for r in resolved) + 1):
        labels = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in resolved]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="training run folders to analyze")
    p.add_argument("--manifest", required=True, help="labelled examples (JSONL with 'category'), e.g. the val split")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="folder for analysis.json and the PNGs")
    p.add_argument("--what", nargs="+", choices=ANALYSES, default=list(ANALYSES), help="which analyses to run")
    p.add_argument("--batch-size", type=int, default=16, help="examples per category batch (gradients, influence)")
    p.add_argument("--num-batches", type=int, default=4, help="batches per category (gradients, influence)")
    p.add_argument("--step-size", type=float, default=1e-2, help="lambda: length of the simulated step (eq. 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch draw")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_flag(p)
    args = p.parse_args(argv)
    for flag in ("batch_size", "num_batches"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if not (math.isfinite(args.step_size) and args.step_size > 0):
        p.error(f"--step-size must be a positive finite number, got {args.step_size}")
    device = device_from_flag(p, args)
    for run in args.runs:
        if not (run / "config.json").is_file():
            p.error(f"{run} is not a training run folder (no config.json)")
    examples = read_manifest(args.manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        label: analyze_run(
            run,
            examples,
            analyses=args.what,
            batch_size=args.batch_size,
            num_batches=args.num_batches,
            step_size=args.step_size,
            seed=args.seed,
            progress=not args.quiet,
            device=device,
        )
        for label, run in zip(run_labels(args.runs), args.runs, strict=True)
    }
    (args.out / "analysis.json").write_text(json.dumps(results, indent=1))
    for path in write_figures(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'analysis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
