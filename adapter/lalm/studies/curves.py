"""Training curves of runs of `adapter.lalm.train` (your own, the demo's, the experiment runners'),
read from each run folder's log.jsonl, in one figure:

    python -m adapter.lalm.studies.curves runs/demo/dense runs/demo/moe-8c4-parallel --out curves.png

One colour per run; a run still training is read as far as it has written. Per-step series
are drawn faint, with their moving mean over --smooth logged steps solid. Panels:
  next-token loss   on answer tokens, and the held-out evaluations (markers); log scale
  learning rate     the schedule as it ran (router group excluded)
  gradient norm     before clipping (log scale), the clip level dashed; a step skipped as
                    non-finite (or, under --fp16, as an overflow) is a red x at the panel's top
  balance loss      the unweighted L_aux of MoE runs (eq. 10; steps without audio leave gaps),
                    dotted at k, its value when every expert gets the same share
  expert load       the busiest and the idlest expert's share of the step's routed tokens, times E
                    (1: balanced; 0: an expert nobody routes to), of the run's first MoE adapter
  tokens / s        text positions (prompt and answer, padding left out) per second of each step,
                    all processes together
  loss scale        --fp16 runs only: the dynamic loss scale (halved at each overflow)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from adapter.cli import run_cli
from adapter.lalm.plots import pyplot, save
from adapter.lalm.training.runs import log_lines

SKIP_MARK = "x"
PANELS = ("next-token loss", "learning rate", "gradient norm", "balance loss L_aux", "expert load x E", "tokens / s")
FP16_PANEL = "loss scale (fp16)"
STEP_LINES = (("learning rate", "lr"), (FP16_PANEL, "loss_scale"))  # (panel, log key)


def read_run(run_dir: str | Path) -> dict:
    """{'name', 'steps': the per-step records, 'evals': (step, val_loss) pairs, 'top_k', 'clip'} of a
    run folder (config.json gives k and the clip level where it is there)."""
    run = Path(run_dir)
    log = run / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{run} holds no training log ({log} is missing): is it a run folder?")
    records = [r for _, r in log_lines(log)]
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    return {
        "name": run.name if run.name not in ("", ".") else str(run.resolve().name),
        "steps": [r for r in records if "ntp" in r],
        "evals": sorted(set(evals)),  # a final evaluation repeats the last step's
        "top_k": _top_k(cfg.get("model") or {}),
        "clip": cfg.get("grad_clip") or None,
    }


def _top_k(model_cfg: dict) -> int | None:
    """k of a run's MoE adapter (None for the dense one or an unknown preset)."""
    from adapter.presets import PRESETS, preset

    name = model_cfg.get("adapter")
    if name not in PRESETS:
        return None
    try:
        k = getattr(preset(name, 64, 64), "top_k", None)  # k does not depend on the widths
    except ValueError:
        return None
    return (model_cfg.get("top_k") or k) if k is not None else None


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last `window` finite values at each point (non-finite ones are left out; a
    point before any finite value is NaN)."""
    out, recent = [], []
    for v in values:
        if v is not None and math.isfinite(v):
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def plot_runs(runs: list[dict], path: str | Path, smooth: int = 20) -> dict:
    """Draw the panels (module docstring) for `runs` (from read_run) into `path`; returns
    {panel title: {run name: (steps, values)}} of what was drawn, for tests and for reading."""
    if not runs:
        raise ValueError("no runs to plot")
    if len({run["name"] for run in runs}) < len(runs):
        raise ValueError(f"two runs share a name ({[run['name'] for run in runs]}): give them distinct names")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    plt = pyplot()
    fp16 = any(r.get("loss_scale") is not None for run in runs for r in run["steps"])
    titles = [*PANELS, FP16_PANEL] if fp16 else list(PANELS)
    cols = 4 if fp16 else 3
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 7.5), squeeze=False)
    ax = dict(zip(titles, axes.flat, strict=False))
    for extra in list(axes.flat)[len(titles) :]:
        extra.axis("off")
    drawn: dict = {t: {} for t in titles}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def noisy(title, steps, values, color, label, ls="-"):
        """Each logged step faint, the moving mean over `smooth` of them solid; returns the mean."""
        mean = moving_mean(values, smooth)
        ax[title].plot(steps, values, color=color, alpha=0.2, lw=0.7, ls=ls)
        ax[title].plot(steps, mean, color=color, ls=ls, label=label)
        return mean

    for i, run in enumerate(runs):
        c, name, rows = colors[i % len(colors)], run["name"], run["steps"]
        steps, ntp = _series(rows, "ntp")
        drawn["next-token loss"][name] = (steps, noisy("next-token loss", steps, ntp, c, f"{name} train"))
        if run["evals"]:
            es, ev = zip(*run["evals"], strict=True)
            ax["next-token loss"].plot(es, ev, "o--", color=c, ms=4, label=f"{name} held-out")
        for title, key in STEP_LINES:  # the schedule and the loss scale: exact steps, not smoothed
            if title in ax and (series := _series(rows, key))[1]:
                ax[title].plot(*series, color=c, label=name)
                drawn[title][name] = series
        s, v = _series(rows, "tokens_per_s")
        drawn["tokens / s"][name] = (s, noisy("tokens / s", s, v, c, name))
        s, v = _series([r for r in rows if not r.get("skipped")], "grad_norm")
        drawn["gradient norm"][name] = (s, noisy("gradient norm", s, v, c, name))
        skipped = [r["step"] for r in rows if r.get("skipped")]
        if skipped:
            top = ax["gradient norm"].get_xaxis_transform()  # x in steps, y in axes fraction
            ax["gradient norm"].plot(skipped, [0.97] * len(skipped), SKIP_MARK, color="red", transform=top)
        if run["clip"]:
            ax["gradient norm"].axhline(run["clip"], color=c, ls="--", lw=0.8)
        s, v = _series(rows, "aux")
        if v:
            drawn["balance loss L_aux"][name] = (s, noisy("balance loss L_aux", s, v, c, name))
            if run["top_k"]:
                ax["balance loss L_aux"].axhline(run["top_k"], color=c, ls=":", lw=1)
        loads = [(r["step"], r["expert_load_0"]) for r in rows if r.get("expert_load_0")]
        if loads:
            s = [st for st, _ in loads]
            hi = noisy("expert load x E", s, [max(sh) * len(sh) for _, sh in loads], c, f"{name} busiest")
            lo = noisy("expert load x E", s, [min(sh) * len(sh) for _, sh in loads], c, f"{name} idlest", ls="--")
            drawn["expert load x E"][name] = (s, hi, lo)
    for title, a in ax.items():
        a.set_title(title)
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    for title in ("next-token loss", "gradient norm", FP16_PANEL):
        if title in ax and drawn[title]:
            ax[title].set_yscale("log")
    if drawn["expert load x E"]:
        ax["expert load x E"].axhline(1.0, color="gray", ls=":", lw=1)
    save(fig, path)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run folders of adapter.lalm.train (each holds log.jsonl)")
    p.add_argument("--out", default="curves.png", help="the figure's path (default: curves.png)")
    p.add_argument("--smooth", type=int, default=20, help="logged steps in each moving mean (default: 20)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    out = Path(args.out)
    out = out / "curves.png" if out.is_dir() else out if out.suffix else out.with_suffix(".png")  # what is written
    if not out.parent.is_dir():
        p.error(f"--out {args.out}: the folder {out.parent} does not exist")
    runs = [read_run(r) for r in args.runs]
    if len({run["name"] for run in runs}) < len(runs):  # runs/seed-0/dense, runs/seed-1/dense: name them by path
        for run, path in zip(runs, args.runs, strict=True):
            run["name"] = path.rstrip("/")
    plot_runs(runs, out, args.smooth)
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
