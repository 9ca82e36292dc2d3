"""Does sparse routing earn its keep? The pre-registered, powered MoE-vs-dense comparison (issue 40).

    python -m adapter.lalm.studies.powered --resume      # 15 seeds x 4 arms, resumable across sessions

Fixed here before any run; changing one is a new study, not a re-analysis:

- ARMS, every one trained on the same corpus, data order and LLM start within a seed:
    dense          the dense adapter at equal total parameters (98,688 at d = 64, D = 128)
    moe            moe-8c4-parallel, the recommended preset (99,328 total, 74,752 active)
    moe-frozen     the same block with its router frozen at initialization: routing that depends on
                   the token but is not learned
    dense-active   a dense adapter of the MoE preset's active parameter count (74,688): its compute
                   per token, no routing
- SEEDS 100-114: 15 seeds, each its own corpus (version 8); none is a seed an earlier study read.
  With the seed-level SD of the paired difference seen before (2.6 points, seeds-v7), 15 seeds
  detect about 2.0 points at 80% power (two-sided t, alpha 0.05).
- ENDPOINT: MMAU-style accuracy (the generated answers, as the demo's table), per seed and arm, on
  PRIMARY_TASKS: the 9 of 16 tasks that carried signal in seeds-v7 (other seeds; the 5 tasks at
  >= 97% for both adapters and the 2 scored identically by both, a constant answer, are left out
  and reported apart with all 16).
- COMPARISONS: moe - dense, moe - moe-frozen, moe - dense-active, paired per seed.
- DECISION on the 95% Student-t interval over seeds of the mean paired difference, in points:
  better (lower bound > 0), non-inferior (lower bound > MARGIN = -1.0), worse (upper bound < 0),
  else inconclusive (not shown non-inferior). Learned routing earns its keep only if moe is
  better than both moe-frozen and dense-active.
- ONE MACHINE, ONE COMMIT, ONE THREAD COUNT: every run records the commit, the machine and its torch
  thread count; a resume elsewhere, at another commit or thread count, is refused.

Per-item predictions of every run (id, task, gold, predicted, per-option log-likelihoods) go to
<out>/predictions.jsonl.gz; the item-level reading (the pooled paired bootstrap) is computed from
that file. Writes <out>/powered.json and powered.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from adapter.cli import run_cli
from adapter.environment import environment
from adapter.lalm.config import TrainConfig
from adapter.lalm.studies.experiment import (
    ExperimentConfig,
    add_experiment_args,
    experiment_from_args,
    pin_threads,
    train_and_evaluate,
)
from adapter.lalm.studies.paired import paired_difference
from adapter.lalm.studies.seeds import t_interval

ARMS = {  # name: (adapter preset, routing)
    "dense": ("dense", "learned"),
    "moe": ("moe-8c4-parallel", "learned"),
    "moe-frozen": ("moe-8c4-parallel", "frozen"),
    "dense-active": ("dense-active", "learned"),
}
SEEDS = tuple(range(100, 115))
PRIMARY_TASKS = (
    "music/direction",
    "music/instrument",
    "sound/knock count",
    "sound/which sound",
    "speech/gender",
    "speech/rate",
    "speech/transcription",
    "speech/voice pitch",
    "speech/word count",
)
COMPARISONS = (("moe", "dense"), ("moe", "moe-frozen"), ("moe", "dense-active"))
MARGIN = -0.01  # non-inferiority margin: -1.0 point of accuracy
LEVEL = 0.95


def decide(low: float, high: float) -> str:
    """The pre-registered verdict of a paired difference's interval (fractions of accuracy)."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "non-inferior" if low > MARGIN else "inconclusive"


def _adjust(routing: str):
    def adjust(cfg: TrainConfig) -> TrainConfig:
        return replace(cfg, model=replace(cfg.model, routing=routing)) if routing != "learned" else cfg

    return adjust


def run_seed(exp: ExperimentConfig, seed: int, arms: tuple[str, ...]) -> dict[str, dict]:
    """{arm: evaluation} of one seed: its corpus, then its arms one after another."""
    seed_exp = exp.with_(
        seed=seed, out=str(Path(exp.out) / f"seed-{seed}"), corpus=str(Path(exp.corpus) / f"seed-{seed}")
    )
    manifests = seed_exp.build_corpus()
    out = {}
    for arm in arms:
        preset, routing = ARMS[arm]
        out[arm] = train_and_evaluate(seed_exp, preset, manifests, name=arm, adjust=_adjust(routing))["eval"]
    return out


def run_study(
    exp: ExperimentConfig, seeds: tuple[int, ...] = SEEDS, arms: tuple[str, ...] = tuple(ARMS), jobs: int = 1
) -> dict[int, dict[str, dict]]:
    """{seed: {arm: evaluation}}, training what is not there yet (resumable: finished runs are
    reused when exp.run.resume). `jobs` > 1: that many seeds at once, each in a process of its own
    (spawned: no state shared with this one), every run at exp.threads."""
    if jobs == 1:
        return {seed: run_seed(exp, seed, arms) for seed in seeds}
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {seed: pool.submit(run_seed, exp, seed, arms) for seed in seeds}
        return {seed: f.result() for seed, f in futures.items()}


def write_predictions(results: dict[int, dict[str, dict]], path: Path) -> None:
    """One JSON line per (seed, arm, item): what every item-level reading is computed from."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for seed, arms in sorted(results.items()):
            for arm, ev in arms.items():
                for row in ev["predictions"]:
                    keep = ("id", "task", "category", "answer", "prediction", "correct", "loglik_choice")
                    line = {"seed": seed, "arm": arm, **{k: row.get(k) for k in keep}}
                    line["option_logprobs"] = row.get("option_logprobs")
                    fh.write(json.dumps(line) + "\n")


def read_predictions(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def accuracy(rows: list[dict], tasks: tuple[str, ...] | None = None) -> float:
    """MMAU-style accuracy of prediction rows (scored items only), on `tasks` (None: all)."""
    scored = [r for r in rows if r.get("correct") is not None]
    if tasks is not None:
        scored = [r for r in scored if f"{r['category']}/{r['task']}" in tasks]
    return sum(bool(r["correct"]) for r in scored) / len(scored) if scored else math.nan


def summarize(rows: list[dict]) -> dict:
    """Every reading of the module docstring from the per-item rows: per arm and seed the primary
    and all-task accuracy, each comparison's paired seed-level interval and verdict, and the
    pooled item-level paired bootstrap (secondary: it holds the trained models fixed)."""
    seeds = sorted({r["seed"] for r in rows})
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    by = {(s, a): [r for r in rows if r["seed"] == s and r["arm"] == a] for s in seeds for a in arms}
    out: dict = {"seeds": seeds, "arms": {}, "comparisons": {}, "margin": MARGIN, "level": LEVEL}
    for a in arms:
        primary = [accuracy(by[s, a], PRIMARY_TASKS) for s in seeds]
        every = [accuracy(by[s, a]) for s in seeds]
        out["arms"][a] = {
            "primary": primary,
            "primary_ci": t_interval(primary, LEVEL),
            "all_tasks": every,
            "all_tasks_ci": t_interval(every, LEVEL),
        }
    for a, b in COMPARISONS:
        if a not in arms or b not in arms:
            continue
        diffs = [x - y for x, y in zip(out["arms"][a]["primary"], out["arms"][b]["primary"], strict=True)]
        mean, low, high = t_interval(diffs, LEVEL)
        strata_a, strata_b = [], []
        for s in seeds:
            theirs = {r["id"]: r for r in by[s, b] if f"{r['category']}/{r['task']}" in PRIMARY_TASKS}
            mine = [r for r in by[s, a] if r["id"] in theirs and r.get("correct") is not None]
            strata_a.append([bool(r["correct"]) for r in mine])
            strata_b.append([bool(theirs[r["id"]]["correct"]) for r in mine])
        pooled = paired_difference(strata_a, strata_b)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        out["comparisons"][f"{a} - {b}"] = {
            "diffs": diffs,
            "mean": mean,
            "ci": [low, high],
            "sd": sd,
            "verdict": decide(low, high) if len(diffs) > 1 else "too few seeds",
            "items_pooled": {"diff": pooled.diff, "ci": [pooled.low, pooled.high], "n": pooled.n},
        }
    return out


def markdown(summary: dict, info: dict) -> str:
    pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    seeds = summary["seeds"]
    lines = [
        "# Does sparse routing earn its keep? (issue 40, pre-registered in adapter/lalm/studies/powered.py)",
        "",
        f"Seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}); machine {info.get('device')}; torch {info.get('torch')}; "
        f"commit {info.get('git_sha')}; {info.get('threads')} torch thread(s) per run.",
        "",
        f"Primary endpoint: MMAU-style accuracy on {len(PRIMARY_TASKS)} tasks that carry signal; mean and "
        f"{int(100 * LEVEL)}% interval over seeds (%).",
        "",
        "| arm | primary | all 16 tasks |",
        "|---|---|---|",
    ]
    for a, r in summary["arms"].items():
        m, lo, hi = r["primary_ci"]
        m2, lo2, hi2 = r["all_tasks_ci"]
        lines.append(f"| {a} | {pct(m)} [{pct(lo)}, {pct(hi)}] | {pct(m2)} [{pct(lo2)}, {pct(hi2)}] |")
    lines += [
        "",
        f"Paired differences (points), seed-level interval, verdict (margin {100 * MARGIN:+.1f}); the pooled "
        "item-level bootstrap is secondary (it holds the trained models fixed):",
        "",
        "| comparison | mean [interval] | SD over seeds | verdict | items pooled |",
        "|---|---|---|---|---|",
    ]
    for name, c in summary["comparisons"].items():
        lo, hi = c["ci"]
        ip = c["items_pooled"]
        lines.append(
            f"| {name} | {pts(c['mean'])} [{pts(lo)}, {pts(hi)}] | {100 * c['sd']:.1f} | {c['verdict']} | "
            f"{pts(ip['diff'])} [{pts(ip['ci'][0])}, {pts(ip['ci'][1])}] |"
        )
    return "\n".join(lines) + "\n"


PINNED = ("device", "device_detail", "torch", "git_sha", "threads")
"""What every run of the study shares (the pairing's premise): a resume anywhere else is refused."""


def check_same_setting(out: Path, info: dict) -> None:
    """Write <out>/study.json at the first start; refuse a later start that differs in PINNED."""
    record = out / "study.json"
    now = {k: info.get(k) for k in PINNED}
    if record.is_file():
        then = json.loads(record.read_text())
        if diffs := [f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in PINNED if then.get(k) != now[k]]:
            raise ValueError(
                f"{out} holds runs of this study made on another machine, commit or thread count ({'; '.join(diffs)}): "
                "finish it where it started, or start afresh in another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(now, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.powered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (pre-registered: 100-114)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms (pre-registered: all)")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="seeds trained at once, each in its own process; with --threads 0 each gets cores / jobs threads "
        "(the thread count is pinned for the whole study: keep one --jobs from start to end). 0 (default): one "
        "per core at 1 thread each, measured faster than one run at a time with every core (two 300-step runs: "
        "91 s against 111 s on the 2-core AMD EPYC; benchmarks/results/sweep-jobs-cpu-2026-12-08)",
    )
    add_experiment_args(p, out="runs/powered", corpus="data/corpus-powered")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    if args.jobs < 0:
        p.error(f"--jobs must be >= 0, got {args.jobs}")
    args.jobs = args.jobs or max(1, torch.get_num_threads())
    exp = experiment_from_args(args)
    if args.jobs > 1 and not exp.threads:  # every run at the same count: cores shared evenly
        exp = exp.with_(threads=max(1, torch.get_num_threads() // args.jobs))
    threads = pin_threads(exp)
    out = Path(exp.out)
    info = {**environment(), "threads": threads}
    try:
        check_same_setting(out, info)
    except ValueError as exc:
        p.error(str(exc))
    results = run_study(exp, tuple(args.seeds), tuple(args.arms), args.jobs)
    write_predictions(results, out / "predictions.jsonl.gz")
    summary = summarize(read_predictions(out / "predictions.jsonl.gz"))
    (out / "powered.json").write_text(json.dumps({"summary": summary, "environment": info}, indent=1))
    text = markdown(summary, info)
    (out / "powered.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
