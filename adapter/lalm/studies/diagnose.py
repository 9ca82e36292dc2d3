"""Why an MoE adapter learns less than the dense one it replaces: measurements on trained runs.

    python -m adapter.lalm.studies.diagnose runs/seeds/seed-*/dense runs/seeds/seed-*/moe-8c4 --out runs/diagnose

For each run, at its initialization (step 0, rebuilt from its seed) and at every kept checkpoint:

1. Information flow: linear probes (multinomial logistic regression, fixed L2, fitted on the train
   split, scored on the test split) for the content tasks (instrument, which sound, gender,
   direction, and the constant-answer ones, mode and background) on pooled activations at three
   sites: the adapter's input, its middle (MoE: the routed sum h; dense: the hidden activation)
   and its output. Pooled two ways: the mean over frames (what the issue asked) and the means of
   the first and second half concatenated (direction is about order, which a mean cannot see).
2. Optimization (MoE): router entropy (normalized, 1 = uniform over E), the top-k gate values,
   routing churn (the fraction of the same test tokens whose expert set, or first expert, changed
   since the previous checkpoint), load spread and how much the per-category rates differ.
3. Learning (bug hunt): the gradient norm of every adapter part (router, each expert, aggregation,
   LayerNorms) and the fusion layer on one fixed batch of training examples, and each part's
   distance from its initialization, relative to its initial norm.

Writes <out>/diagnose.json (everything, per run), diagnose.md (means over seeds) and diagnose.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from adapter.cli import run_cli
from adapter.lalm.data import Example, FeatureSource, collate, read_manifest, read_manifests
from adapter.lalm.model import AudioLLM
from adapter.lalm.plots import pyplot, save
from adapter.lalm.studies.analysis import answer_loss
from adapter.lalm.training.checkpoint import load_trained, run_features
from adapter.lalm.training.runs import RunFolder, checkpoint_steps
from adapter.lalm.training.setup import add_device_flag, default_device, device_from_flag

PROBE_TASKS = ("instrument", "which sound", "gender", "direction", "mode", "background")
SITES = ("input", "middle", "output")
POOLINGS = ("mean", "halves")
PROBE_L2 = 1e-3  # fixed before any run: a mild ridge so separable classes keep finite weights
GRAD_BATCH = 32  # training examples in the fixed gradient batch (all tasks, seeded draw)


# ------------------------------------------------------------------------------ activations


def _pool(a_BFC: torch.Tensor, mask_BF: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: the masked mean over frames, and the first/second-half means concatenated."""
    out = {"mean": [], "halves": []}
    for b in range(a_BFC.shape[0]):
        a = a_BFC[b][mask_BF[b]].double()
        half = max(1, a.shape[0] // 2)
        out["mean"].append(a.mean(0))
        out["halves"].append(torch.cat([a[:half].mean(0), a[half:].mean(0) if a.shape[0] > 1 else a.mean(0)]))
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def capture(model: AudioLLM, examples: list[Example], source: FeatureSource, batch_size: int = 32) -> dict:
    """Pooled activations per site and pooling, (N, width) each, and for an MoE adapter the routing
    of every real token: router probabilities (T, E), top-k experts and gates (T, K), categories.
    Computed on the model's device, returned on the CPU."""
    adapter = model.adapter
    acts: dict = {}
    hooks = [adapter.register_forward_hook(lambda m, args, out: acts.update(input=args[0], output=out))]
    is_moe = hasattr(adapter, "routed_experts")
    if is_moe:
        original = adapter.routed_experts

        def routed(z_TD, mask_T):
            out = original(z_TD, mask_T)
            acts.update(middle=out.h_TD, z=z_TD, routing=out)
            return out

        adapter.routed_experts = routed
    elif hasattr(adapter, "up"):
        hooks.append(adapter.up.register_forward_hook(lambda m, args, out: acts.update(middle=F.silu(out))))
    pooled = {(s, p): [] for s in SITES for p in POOLINGS}
    routing = defaultdict(list)
    try:
        model.eval()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, model.tokenizer, source, with_answer=False).to(model.device)
            feats, mask_BF = model.audio_inputs(batch)
            model.embed_audio(feats, mask_BF, batch.category_B)
            B, Fr = mask_BF.shape
            for site in SITES:
                if site in acts:
                    for pooling, v in _pool(acts[site].reshape(B, Fr, -1), mask_BF).items():
                        pooled[(site, pooling)].append(v.cpu())
            if is_moe:
                keep_T = mask_BF.reshape(-1)
                out = acts["routing"]
                probs_TE = torch.softmax(adapter.router(acts["z"]).float(), dim=-1)
                routing["probs"].append(probs_TE[keep_T].cpu())
                routing["idx"].append(out.topk_idx_TK[keep_T].long().cpu())
                routing["gates"].append(out.topk_weight_TK[keep_T].float().cpu())
                cats = [ex.category for ex in chunk for _ in range(Fr)]
                routing["category"] += [c for c, k in zip(cats, keep_T.tolist(), strict=True) if k]
    finally:
        for h in hooks:
            h.remove()
        if is_moe:
            del adapter.routed_experts
    result = {"pooled": {k: torch.cat(v) for k, v in pooled.items() if v}}
    if is_moe:
        result["routing"] = {k: (v if k == "category" else torch.cat(v)) for k, v in routing.items()}
    return result


# ------------------------------------------------------------------------------ probes


def probe_accuracy(X_train: torch.Tensor, y_train: list[str], X_test: torch.Tensor, y_test: list[str]) -> float:
    """Held-out accuracy of a multinomial logistic regression (float64, L-BFGS, L2 = PROBE_L2 on
    the weights) on features standardized with the training statistics."""
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    Xtr, Xte = (X_train - mean) / std, (X_test - mean) / std
    ytr = torch.tensor([index[c] for c in y_train])
    W = torch.zeros(Xtr.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xtr @ W + b, ytr) + PROBE_L2 * W.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (Xte @ W + b).argmax(1).tolist()
    return sum(classes[p] == y for p, y in zip(pred, y_test, strict=True)) / len(y_test)


def probes(model: AudioLLM, train: list[Example], test: list[Example], source: FeatureSource) -> dict:
    """{task: {site/pooling: held-out accuracy}} for every probe task present in both splits."""
    cap_tr, cap_te = capture(model, train, source)["pooled"], capture(model, test, source)["pooled"]
    out = {}
    for task in PROBE_TASKS:
        tr = [i for i, ex in enumerate(train) if ex.task == task]
        te = [i for i, ex in enumerate(test) if ex.task == task]
        if not tr or not te:
            continue
        ytr, yte = [train[i].answer for i in tr], [test[i].answer for i in te]
        out[task] = {
            f"{site}/{pooling}": probe_accuracy(cap_tr[(site, pooling)][tr], ytr, cap_te[(site, pooling)][te], yte)
            for (site, pooling) in cap_tr
        }
    return out


def majority_rate(train: list[Example], test: list[Example]) -> dict[str, float]:
    """Per task: the test accuracy of always answering the training split's most common answer."""
    out = {}
    for task in PROBE_TASKS:
        ytr = [ex.answer for ex in train if ex.task == task]
        yte = [ex.answer for ex in test if ex.task == task]
        if ytr and yte:
            top = max(sorted(set(ytr)), key=ytr.count)
            out[task] = sum(y == top for y in yte) / len(yte)
    return out


# ------------------------------------------------------------------------------ routing


def routing_stats(routing: dict, previous: dict | None) -> dict:
    """Router entropy, gates, load and category separation; churn against `previous` (the same
    tokens at the previous checkpoint)."""
    probs, idx, gates = routing["probs"], routing["idx"], routing["gates"]
    E = probs.shape[1]
    entropy = float((-(probs * probs.clamp_min(1e-30).log()).sum(1) / math.log(E)).mean())
    onehot = torch.zeros_like(probs).scatter_(1, idx, 1.0)
    load = onehot.mean(0)
    cats = sorted(set(routing["category"]))
    rates = torch.stack([onehot[[c == k for c in routing["category"]]].mean(0) for k in cats])
    stats = {
        "entropy": entropy,
        "gates": gates.mean(0).tolist(),  # best first
        "load_cv": float(load.std(unbiased=False) / load.mean()),
        "category_separation": float(rates.std(0, unbiased=False).mean()),  # 0: every category routed alike
        "churn": None,
        "top1_churn": None,
    }
    if previous is not None:
        prev = torch.zeros_like(probs).scatter_(1, previous["idx"], 1.0)
        stats["churn"] = float((prev != onehot).any(1).double().mean())
        stats["top1_churn"] = float((previous["idx"][:, 0] != idx[:, 0]).double().mean())
    return stats


# ------------------------------------------------------------------------------ learning


def _parts(model: AudioLLM) -> dict[str, list[tuple[torch.nn.Parameter, int | None]]]:
    """The trainable audio-path weights by part, as (parameter, expert index or None): every
    expert on its own (w1[e] and w2[e]), the other adapter modules and the fusion layer whole."""
    parts: dict[str, list] = defaultdict(list)
    for name, p in model.adapter.named_parameters():
        if name in ("w1", "w2"):
            for e in range(p.shape[0]):
                parts[f"expert{e}"].append((p, e))
        else:
            parts[name.split(".")[0]].append((p, None))
    if model.fusion is not None:
        parts["fusion"] += [(p, None) for p in model.fusion.parameters()]
    return dict(parts)


def part_norms(model: AudioLLM, of_grad: bool = False, minus: dict[str, torch.Tensor] | None = None) -> dict:
    """Per part: the norm of its weights (or their gradients, or their difference from `minus`,
    a {parameter name: tensor} of the same model's weights at another step)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for part, members in _parts(model).items():
        total = 0.0
        for p, e in members:
            t = p.grad if of_grad else p
            if t is None:
                continue
            if minus is not None:
                t = t - minus[names[id(p)]]
            total += float((t if e is None else t[e]).detach().double().square().sum())
        out[part] = math.sqrt(total)
    return out


def gradient_norms(model: AudioLLM, batch) -> dict[str, float]:
    """Per part: the norm of the answer loss's gradient on `batch` (no balance loss: what the
    task asks of each part)."""
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        answer_loss(model, batch).backward()
    norms = part_norms(model, of_grad=True)
    for p in model.parameters():
        p.grad = None
    return norms


# ------------------------------------------------------------------------------ one run


def _run_label(run: Path) -> tuple[str, int]:
    """('preset' plus what differs from the defaults the runs were compared under, seed)."""
    cfg = RunFolder(run).read_config()
    label = cfg["model"]["adapter"]
    if cfg.get("router_lr_scale", 1.0) != 1.0:
        label += f" router-lr x{cfg['router_lr_scale']:g}"
    if cfg["model"].get("expert_init", "independent") != "independent":
        label += f" {cfg['model']['expert_init']}"
    return label, int(cfg["seed"])


def diagnose_run(
    run: Path, train: list[Example], test: list[Example], *, progress: bool = True, device: torch.device | None = None
) -> dict:
    """Every measurement of the module docstring for one run, on `device` (default: the GPU when
    there is one)."""
    from tqdm import tqdm

    device = device or default_device()
    label, seed = _run_label(run)
    steps = [0, *checkpoint_steps(run)]
    final = load_trained(run, device=device)
    source = run_features(run, final)
    probe_train = [ex for ex in train if ex.task in PROBE_TASKS and ex.audio is not None]
    probe_test = [ex for ex in test if ex.task in PROBE_TASKS and ex.audio is not None]
    routing_test = [ex for ex in test if ex.audio is not None]
    rng = random.Random(seed)
    grad_examples = rng.sample([ex for ex in train if ex.audio is not None], GRAD_BATCH)
    grad_batch = collate(grad_examples, final.tokenizer, source).to(final.device)
    result: dict = {"run": str(run), "label": label, "seed": seed, "steps": steps, "probes": {}, "routing": []}
    result["grad_norm"], result["drift"], result["weight_norm"] = [], [], []
    init_state = None
    previous = None
    for step in tqdm(steps, desc=f"diagnose {run}", disable=not progress):
        model = final if step == steps[-1] else load_trained(run, step=step, device=device)
        if step == 0:
            init_state = {n: p.detach().clone() for n, p in model.named_parameters()}
            result["weight_norm"] = part_norms(model)
        if step in (0, steps[-1]):
            result["probes"]["init" if step == 0 else "final"] = probes(model, probe_train, probe_test, source)
        if hasattr(model.adapter, "routed_experts"):
            routing = capture(model, routing_test, source)["routing"]
            result["routing"].append({"step": step, **routing_stats(routing, previous)})
            previous = routing
        result["grad_norm"].append({"step": step, **gradient_norms(model, grad_batch)})
        result["drift"].append({"step": step, **part_norms(model, minus=init_state)})
    result["majority"] = majority_rate(probe_train, probe_test)
    return result


# ------------------------------------------------------------------------------ summary


GROUPS = {
    "router": ("router",),
    "projection": ("agg_up", "agg_down", "agg_norm", "proj", "up", "down"),
    "layer norms": ("norm_in", "norm_out"),
    "fusion": ("fusion",),
}
"""Parts summed into one number per row; experts are shown one by one as min-max."""


def _group(values: dict[str, float], parts: tuple[str, ...]) -> float | None:
    present = [values[p] for p in parts if p in values]
    return math.sqrt(sum(v * v for v in present)) if present else None


def _experts(values: dict[str, float]) -> list[float]:
    return [v for k, v in values.items() if k.startswith("expert")]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: list[dict]) -> str:
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_label[r["label"]].append(r)
    tasks = [t for t in PROBE_TASKS if any(t in r["probes"].get("final", {}) for r in results)]
    seeds = "; ".join(f"{label}: seeds {sorted(r['seed'] for r in runs)}" for label, runs in by_label.items())
    lines = [
        f"Means over each adapter's runs ({seeds}). Probe accuracy (%) on the test split; "
        "'mean' pools frames by their mean, 'halves' concatenates the first and second half's means.",
        "",
        "## Linear probes (information flow)",
        "",
        "| adapter | stage | site | " + " | ".join(f"{t} (mean)" for t in tasks) + " | direction (halves) |",
        "|---|---|---|" + "---|" * (len(tasks) + 1),
    ]
    majority = {t: _mean([r["majority"].get(t) for r in results]) for t in tasks}
    lines.append(
        "| (majority answer) | - | - | " + " | ".join(_fmt(100 * majority[t], ".0f") for t in tasks) + " | - |"
    )
    for label, runs in by_label.items():
        for stage in ("init", "final"):
            for site in SITES:
                key = f"{site}/mean"
                if not any(key in r["probes"][stage].get(t, {}) for r in runs for t in tasks):
                    continue
                cells = [_mean([r["probes"][stage].get(t, {}).get(key) for r in runs]) for t in tasks]
                halves = _mean([r["probes"][stage].get("direction", {}).get(f"{site}/halves") for r in runs])
                lines.append(
                    f"| {label} | {stage} | {site} | "
                    + " | ".join(_fmt(None if v is None else 100 * v, ".0f") for v in cells)
                    + f" | {_fmt(None if halves is None else 100 * halves, '.0f')} |"
                )
    lines += [
        "",
        "## Routing over training (test-split audio tokens)",
        "",
        "Entropy: the router's softmax, normalized (1 = uniform over E). Gates: mean top-k weights, best "
        "first. Churn: fraction of the same tokens whose expert set (first expert) changed since the "
        "previous checkpoint. Separation: mean over experts of the std of the per-category rates.",
        "",
        "| adapter | step | entropy | gates | churn | top-1 churn | load CV | separation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in by_label.items():
        if not runs[0]["routing"]:
            continue
        for i, step in enumerate(runs[0]["steps"]):
            rows = [r["routing"][i] for r in runs if i < len(r["routing"])]
            gates = [_mean([row["gates"][j] for row in rows]) for j in range(len(rows[0]["gates"]))]
            lines.append(
                f"| {label} | {step} | {_fmt(_mean([x['entropy'] for x in rows]))} | "
                + "/".join(_fmt(g, ".2f") for g in gates)
                + " | "
                + " | ".join(
                    _fmt(_mean([x[k] for x in rows])) for k in ("churn", "top1_churn", "load_cv", "category_separation")
                )
                + " |"
            )
    lines += [
        "",
        "## Learning: gradient norms and distance from initialization",
        "",
        "Gradient of the answer loss on one fixed batch of training examples; drift = |W_step - W_0| / |W_0| "
        "per part. Experts: min-max over experts.",
        "",
        "| adapter | step | grad: router | grad: experts | grad: projection | grad: fusion "
        "| drift: router | drift: experts | drift: projection |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in by_label.items():
        for i, step in enumerate(runs[0]["steps"]):
            g = [r["grad_norm"][i] for r in runs]
            rel = [
                {k: v / max(r["weight_norm"][k], 1e-30) for k, v in r["drift"][i].items() if k != "step"} for r in runs
            ]

            def span(rows):
                ex = [_experts(x) for x in rows if _experts(x)]
                if not ex:
                    return "-"
                return f"{_mean([min(e) for e in ex]):.3g}-{_mean([max(e) for e in ex]):.3g}"

            def grp(rows, name):
                return _fmt(_mean([_group(x, GROUPS[name]) for x in rows]), ".3g")

            lines.append(
                f"| {label} | {step} | {grp(g, 'router')} | {span(g)} | {grp(g, 'projection')} | {grp(g, 'fusion')} "
                f"| {grp(rel, 'router')} | {span(rel)} | {grp(rel, 'projection')} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_label[r["label"]].append(r)
    tasks = [t for t in PROBE_TASKS if any(t in r["probes"].get("final", {}) for r in results)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    width = 0.8 / max(len(by_label), 1)
    for i, (label, runs) in enumerate(by_label.items()):
        vals = [_mean([r["probes"]["final"].get(t, {}).get("output/mean") for r in runs]) or 0 for t in tasks]
        axes[0].bar([j + (i - (len(by_label) - 1) / 2) * width for j in range(len(tasks))], [100 * v for v in vals],
                    width, label=label, color=f"C{i}")  # fmt: skip
        if runs[0]["routing"]:
            steps = runs[0]["steps"]
            axes[1].plot(steps, [_mean([r["routing"][k]["entropy"] for r in runs]) for k in range(len(steps))],
                         marker="o", label=label, color=f"C{i}")  # fmt: skip
            axes[2].plot(steps[1:], [_mean([r["routing"][k]["churn"] for r in runs]) for k in range(1, len(steps))],
                         marker="o", label=label, color=f"C{i}")  # fmt: skip
    axes[0].set_xticks(range(len(tasks)), tasks, fontsize=7)
    axes[0].set_ylabel("probe accuracy at the adapter output (%)")
    axes[0].set_title("linear probes after training (mean pooling)")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="step", ylabel="normalized router entropy", title="router entropy")
    axes[2].set(xlabel="step", ylabel="tokens whose expert set changed", title="routing churn between checkpoints")
    for ax in axes[1:]:
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    save(fig, path)


def run_splits(run: Path, test_manifest: Path | None = None) -> tuple[str, Path]:
    """The training manifest(s) `run` recorded, and the test manifest: `test_manifest`, or test.jsonl
    beside the first recorded training manifest (the layout adapter.lalm.corpus writes). Never a
    manifest found relative to where this is run: a run whose split is not there is refused."""
    spec = RunFolder(run).read_config().get("train_manifest") or ""
    first = Path(spec.split(",")[0].partition("*")[0])
    if not spec or not first.is_file():
        raise ValueError(
            f"{run}: the training manifest it recorded, {str(first)!r}, is not there (a relative path is read "
            "from the folder the run was trained in: run diagnose from there)"
        )
    test = test_manifest or first.parent / "test.jsonl"
    if not test.is_file():
        raise ValueError(f"{run}: no test split: {test} is missing beside its training manifest; pass --test-manifest")
    return spec, test


def read_training_examples(spec: str) -> list[Example]:
    """The examples of a run's training manifests, each line once (a weighted manifest repeats lines)."""
    return list({ex.source: ex for ex in read_manifests(spec)}.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.studies.diagnose",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with config.json and checkpoints)")
    p.add_argument("--out", type=Path, default=Path("runs/diagnose"), help="folder for diagnose.json/.md/.png")
    p.add_argument(
        "--test-manifest",
        type=Path,
        help="the split the probes are scored on and routing is read from (default: test.jsonl beside each "
        "run's recorded training manifest)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_flag(p)
    args = p.parse_args(argv)
    device = device_from_flag(p, args)
    missing = [str(r) for r in args.runs if not RunFolder(r).config.is_file()]
    if missing:
        p.error(f"not run folders (no config.json): {missing}")
    try:  # every run's splits before any work
        wanted = {run: run_splits(run, args.test_manifest) for run in args.runs}
    except ValueError as exc:
        p.error(str(exc))
    splits: dict[tuple[str, Path], tuple[list[Example], list[Example]]] = {}
    results = []
    for run in args.runs:
        key = wanted[run]
        if key not in splits:
            splits[key] = (read_training_examples(key[0]), read_manifest(key[1]))
        results.append(diagnose_run(run, *splits[key], progress=not args.quiet, device=device))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnose.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / "diagnose.md").write_text(text)
    plot(results, args.out / "diagnose.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
