"""One experiment setting shared by the demo and every study: the corpus, the model sizes and the
training budget, so every adapter compared is trained on the same data, in the same order, from
the same seed, for the same steps.

`ExperimentConfig.run` is the TrainConfig every run of the experiment starts from (EXPERIMENT_RUN:
the demo's sizes and budget); `train_config` fills in what differs per run (the adapter preset, the
manifests, the folder) and what follows from the experiment's own settings (warmup, batch tokens,
checkpoint cadence). The adapters are the paper's presets scaled to `audio_dim` (dense: hidden 8d;
MoE: 8 experts, top-4, f = d/2, aggregation 4d; see adapter/presets.py); the encoder (OpenAI's
pretrained Whisper tiny.en by default, frozen, its features computed once and cached beside the
corpus) and the LLM (small random Qwen3, trained) are the same for all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from adapter.cli import Stopped
from adapter.lalm.config import (
    MOE_ONLY_DEFAULTS,
    ModelConfig,
    TrainConfig,
    add_dataclass_args,
    arg_type,
    dataclass_from_args,
    option,
)
from adapter.lalm.corpus import SIZES, build_corpus
from adapter.lalm.corpus.build import QUESTIONS
from adapter.lalm.data import read_manifest
from adapter.lalm.evaluate import evaluate
from adapter.lalm.training.checkpoint import load_trained, run_features
from adapter.lalm.training.loop import train
from adapter.lalm.training.runs import RunFolder, config_differences, read_log
from adapter.lalm.training.setup import default_device
from adapter.presets import PRESETS, is_dense

# The run every experiment starts from: TrainConfig's and ModelConfig's defaults, but for the
# experiment's budget (1500 steps at a peak lr of 2e-3) and its sizes (d = 64, a 64-code semantic
# codebook). Where the two defaults differ, this is the experiment's.
EXPERIMENT_RUN = TrainConfig(max_steps=1500, lr=2e-3, model=ModelConfig(audio_dim=64, semantic_codes=64))

# The run settings an experiment runner takes as flags, by their TrainConfig / ModelConfig field
# name, with the shorter names the runners have always accepted as aliases.
RUN_FLAGS = {
    "max_steps": ["--steps"],
    "max_batch_size": ["--batch-size"],
    "lr": [],
    "aux_lambda": [],
    "router_lr_scale": [],
    "seed": [],
    "bf16": [],
    "fp16": [],
    "resume": [],
    "encoder": [],
    "audio_dim": [],
    "semantic_codes": [],
    "tiny_llm_hidden": ["--llm-hidden"],
    "tiny_llm_layers": ["--llm-layers"],
    "expert_init": [],
    "adapter_backend": ["--backend"],
}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}


def experiment_run(base: TrainConfig = EXPERIMENT_RUN, **changes) -> TrainConfig:
    """`base` with `changes`, each a TrainConfig or ModelConfig field by its name."""
    unknown = set(changes) - _MODEL_FIELDS - _TRAIN_FIELDS
    if unknown:
        raise TypeError(f"not a TrainConfig or ModelConfig field: {sorted(unknown)}")
    model = {k: v for k, v in changes.items() if k in _MODEL_FIELDS}
    run = {k: v for k, v in changes.items() if k in _TRAIN_FIELDS}
    return replace(base, **run, model=replace(base.model, **model))


@dataclass(kw_only=True)
class ExperimentConfig:
    """The experiment's own settings, and `run`, the TrainConfig every run of it starts from."""

    out: str = option("runs/demo", "folder for the training runs (one subfolder per adapter), tables and plots")
    corpus: str = option("data/corpus-demo", "corpus folder (built once, then reused)")
    size: str = option("demo", f"corpus size (items per task): {', '.join(sorted(SIZES))}")
    train_per_task: int = option(0, "override the corpus size's training items per task (0: keep it)")
    test_per_task: int = option(0, "override the corpus size's test items per task (0: keep it)")
    questions: int = option(
        QUESTIONS,
        "distinct knowledge questions (more than 100: the wide bank, and spoken-knowledge items take their "
        "split's questions in turn); 1000 gives ~100 held-out test questions per seed",
    )
    knowledge_test: int = option(0, "test items of the spoken-knowledge task (0: as every task)")
    text_weight: int = option(4, "repeats of the text-knowledge questions per epoch")
    checkpoints: int = option(
        4,
        "evenly spaced checkpoints kept per run (the gradient analysis reads their weights; only the newest keeps "
        "the optimizer state, which --resume needs)",
    )
    quiet: bool = option(False, "no progress bars")
    threads: int = option(
        0,
        "torch threads of every run (0: torch's default at start, the machine's cores); BLAS rounds "
        "differently at another count, so runs are compared at one, recorded in each eval.json",
    )
    run: TrainConfig = field(
        default_factory=lambda: EXPERIMENT_RUN, metadata={"help": "the TrainConfig every run starts from"}
    )

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        for name in ("text_weight", "checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("train_per_task", "test_per_task", "knowledge_test", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.run, TrainConfig):
            raise ValueError(f"run must be a TrainConfig, got {type(self.run).__name__}")

    @classmethod
    def of(cls, **settings) -> ExperimentConfig:
        """An experiment from flat settings: its own fields by name, and TrainConfig / ModelConfig
        fields by theirs (changes to EXPERIMENT_RUN)."""
        return cls().with_(**settings)

    def with_(self, **settings) -> ExperimentConfig:
        """This experiment with `settings` changed: its own fields, or its run's (experiment_run)."""
        own = {f.name for f in dataclasses.fields(self)}
        mine = {k: v for k, v in settings.items() if k in own}
        runs = {k: v for k, v in settings.items() if k not in own}
        return replace(self, **mine, run=experiment_run(mine.get("run", self.run), **runs))

    def build_corpus(self) -> dict[str, Path]:
        cfg = replace(SIZES[self.size], seed=self.run.seed)
        if self.train_per_task:
            cfg = replace(cfg, train_per_task=self.train_per_task)
        if self.test_per_task:
            cfg = replace(cfg, test_per_task=self.test_per_task)
        cfg = replace(cfg, questions=self.questions, knowledge_test=self.knowledge_test)
        return build_corpus(self.corpus, cfg, progress=not self.quiet)

    def train_config(self, preset: str, manifests: dict[str, Path], run_dir: Path) -> TrainConfig:
        """The run of `preset` on `manifests` (train, val; "text", when present, is added
        `text_weight` times per epoch): `run` with the adapter, the data and the folder, and what
        follows from the budget: 5% warmup, 160 text positions per example, `checkpoints` evenly
        spaced checkpoints (the newest with the optimizer state)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown adapter preset {preset!r}; choose from {sorted(PRESETS)}")
        run = self.run
        every = max(1, run.max_steps // self.checkpoints)
        text = f",{manifests['text']}*{self.text_weight}" if "text" in manifests else ""
        return replace(
            run,
            train_manifest=f"{manifests['train']}{text}",
            val_manifest=str(manifests["val"]),
            output_dir=str(run_dir),
            feature_cache=str(Path(manifests["train"]).parent / "features"),
            # MoE-only settings apply to the MoE presets of the experiment; a dense run has no router.
            model=replace(run.model, adapter=preset, **(MOE_ONLY_DEFAULTS if is_dense(preset) else {})),
            warmup_steps=max(1, run.max_steps // 20),
            decay_fraction=0.2,
            max_batch_tokens=run.max_batch_size * 160,
            eval_every=every,
            save_every=every,
            keep_checkpoints=self.checkpoints + 1,
            full_checkpoints=1,
            progress=not self.quiet,
            overwrite=not run.resume,  # a rerun trains afresh unless asked to resume
        )


# torch's thread count when this module was imported: what `threads` = 0 means, whatever a run set since.
_DEFAULT_THREADS = torch.get_num_threads()


def pin_threads(exp: ExperimentConfig) -> int:
    """Set torch's thread count for `exp`'s runs (every runner, the demo included, trains through
    train_and_evaluate, so the same settings run at the same count) and return it."""
    threads = exp.threads or _DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads


def train_and_evaluate(
    exp: ExperimentConfig,
    preset: str,
    manifests: dict[str, Path],
    name: str = "",
    adjust: Callable[[TrainConfig], TrainConfig] | None = None,
) -> dict:
    """Train one adapter preset under `exp` in <out>/<name or preset>, evaluate it on the test split
    (`adjust` changes the run's TrainConfig, e.g. a frozen LLM or a wider adapter); returns
    {"eval": evaluate(...), "summary": train summary, "log": log records, "seconds": training wall
    time, summed over resumed calls}.
    The evaluation is also written to the run folder's eval.json. With `exp.run.resume`, a run that
    had finished and been evaluated before this call keeps its evaluation and its training time."""
    threads = pin_threads(exp)
    run_dir = Path(exp.out) / (name or preset)
    folder = RunFolder(run_dir)
    done, timing, resume = folder.eval, folder.train_seconds, exp.run.resume
    finished = resume and done.is_file() and folder.step(exp.run.max_steps).is_dir()
    if not resume:  # a fresh run: an earlier run's evaluation must not outlive it
        done.unlink(missing_ok=True)
    cfg = exp.train_config(preset, manifests, run_dir)
    if adjust is not None:
        cfg = adjust(cfg)
    recorded = json.loads(timing.read_text()).get("threads") if resume and timing.is_file() else None
    if recorded is not None and recorded != threads:  # BLAS would round the rest of the run otherwise
        raise ValueError(
            f"--resume: the run in {run_dir} trained at {recorded} torch thread(s), this call at {threads}: "
            f"pass --threads {recorded}"
        )
    if finished and timing.is_file():
        diffs = config_differences(folder.read_config(), cfg)
        if diffs:
            raise ValueError(f"--resume: the finished run in {run_dir} was trained otherwise ({'; '.join(diffs)})")
        print(f"{name or preset}: reusing the finished, evaluated run in {run_dir}", flush=True)
        log = read_log(run_dir)
        last = [r for r in log if "ntp" in r][-1]
        final = {k: v for r in log if r.get("final") for k, v in r.items() if k != "final"}
        summary = {**last, **final, "steps": last["step"], "skipped_total": last.get("skipped_total", 0)}
        seconds = json.loads(timing.read_text())["seconds"]
        return {"eval": json.loads(done.read_text()), "summary": summary, "log": log, "seconds": seconds}
    # Wall time summed over the calls that trained this run (a resumed run adds to its earlier time,
    # a call stopped by a signal leaves its own for the resume to add to).
    earlier = json.loads(timing.read_text())["seconds"] if resume and timing.is_file() else 0.0
    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except Stopped:
        timing.write_text(json.dumps({"seconds": earlier + time.perf_counter() - t0, "threads": threads}))
        raise
    seconds = time.perf_counter() - t0
    print(f"{name or preset}: at step {exp.run.max_steps}, {seconds:.0f} s in this call", flush=True)
    seconds += earlier
    timing.write_text(json.dumps({"seconds": seconds, "threads": threads}))
    model = load_trained(run_dir, device=default_device())  # where train() ran it
    result = evaluate(model, read_manifest(manifests["test"]), run_features(run_dir, model), seed=exp.run.seed)
    result["threads"] = threads  # trained and evaluated at
    done.write_text(json.dumps(result, indent=1))
    return {"eval": result, "summary": summary, "log": read_log(run_dir), "seconds": seconds}


def add_experiment_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """ExperimentConfig's own fields and the RUN_FLAGS of its run as flags (`--max-steps` or
    `--steps`, `--audio-dim`, ...; help and type from the TrainConfig / ModelConfig field);
    `defaults`, by field name, override EXPERIMENT_RUN's and the fields' own."""
    own = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"run"}
    if unknown := sorted(set(defaults) - own - set(RUN_FLAGS)):
        raise TypeError(f"add_experiment_args: no flag for {unknown}; fields: {sorted(own | set(RUN_FLAGS))}")
    add_dataclass_args(parser, ExperimentConfig, skip=("run",), defaults=defaults)
    for name, aliases in RUN_FLAGS.items():
        cls, source = (ModelConfig, EXPERIMENT_RUN.model) if name in _MODEL_FIELDS else (TrainConfig, EXPERIMENT_RUN)
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        default = defaults.get(name, getattr(source, name))
        tp = typing.get_type_hints(cls)[name]
        kw = {"action": argparse.BooleanOptionalAction} if tp is bool else {"type": arg_type(tp)}
        flags = ["--" + name.replace("_", "-"), *aliases]
        parser.add_argument(*flags, dest=name, default=default, help=f"{f.metadata['help']} (default: {default})", **kw)


def experiment_from_args(args: argparse.Namespace) -> ExperimentConfig:
    exp = dataclass_from_args(ExperimentConfig, args)
    return exp.with_(**{name: getattr(args, name) for name in RUN_FLAGS})
