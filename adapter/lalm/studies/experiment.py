"""One experiment setting shared by the demo, the ablation runner and the analysis report: the
corpus, the model sizes and the training budget, so every adapter compared is trained on the same
data, in the same order, from the same seed, for the same steps.

The adapters are the paper's presets scaled to `audio_dim` (dense: hidden 8d; MoE: 8 experts,
top-4, f = d/2, aggregation 4d; see adapter/presets.py); the encoder (OpenAI's pretrained Whisper
tiny.en by default, frozen, its features computed once and cached beside the corpus) and the LLM
(small random Qwen3, trained) are the same for all.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from adapter.cli import Stopped
from adapter.lalm.config import ModelConfig, TrainConfig, add_dataclass_args, dataclass_from_args, option
from adapter.lalm.corpus import SIZES, build_corpus
from adapter.lalm.corpus.build import QUESTIONS
from adapter.lalm.data import read_manifest
from adapter.lalm.evaluate import evaluate
from adapter.lalm.training.checkpoint import load_trained, run_features
from adapter.lalm.training.loop import train
from adapter.lalm.training.runs import config_differences, log_lines
from adapter.lalm.training.setup import default_device
from adapter.presets import PRESETS


@dataclass(kw_only=True)
class ExperimentConfig:
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
    steps: int = option(1500, "optimizer steps per adapter (the same budget for all)")
    batch_size: int = option(32, "examples per step")
    lr: float = option(2e-3, "peak learning rate (Warmup-Stable-Decay)")
    encoder: str = option(
        "tiny.en",
        "Whisper encoder, frozen: tiny.en (pretrained, OpenAI's weights) or a random one (demo, random-tiny, ...) "
        "or a checkpoint path; see `python -m adapter.lalm.train --help`",
    )
    audio_dim: int = option(64, "d, the adapter input width (paper: 2560)")
    semantic_codes: int = option(64, "k-means codebook of the discrete stream (0: off)")
    llm_hidden: int = option(128, "hidden size of the small random Qwen3")
    llm_layers: int = option(2, "decoder layers of the small random Qwen3")
    aux_lambda: float = option(0.01, "weight of the MoE balance loss (lambda, eq. 6)")
    router_lr_scale: float = option(1.0, "the MoE routers' learning rate as a multiple of --lr")
    expert_init: str = option("independent", "MoE experts' initialization: independent or replicated (one copy)")
    text_weight: int = option(4, "repeats of the text-knowledge questions per epoch")
    seed: int = option(0, "seed of corpus, weights and data order")
    checkpoints: int = option(
        4,
        "evenly spaced checkpoints kept per run (the gradient analysis reads their weights; only the newest keeps "
        "the optimizer state, which --resume needs)",
    )
    backend: str = option("auto", "MoE kernels: auto (Triton on CUDA, torch on CPU), triton or torch")
    bf16: bool = option(
        True, "bf16 autocast on CUDA (ignored on CPU); GPUs below sm_80 (T4, V100): --fp16 or --no-bf16"
    )
    fp16: bool = option(False, "fp16 autocast with a dynamic loss scale instead (T4, V100); see train --help")
    resume: bool = option(False, "continue interrupted runs from their checkpoints instead of training afresh")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        for name in ("steps", "batch_size", "text_weight", "checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("train_per_task", "test_per_task", "knowledge_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def build_corpus(self) -> dict[str, Path]:
        cfg = replace(SIZES[self.size], seed=self.seed)
        if self.train_per_task:
            cfg = replace(cfg, train_per_task=self.train_per_task)
        if self.test_per_task:
            cfg = replace(cfg, test_per_task=self.test_per_task)
        cfg = replace(cfg, questions=self.questions, knowledge_test=self.knowledge_test)
        return build_corpus(self.corpus, cfg, progress=not self.quiet)

    def train_config(self, preset: str, manifests: dict[str, Path], run_dir: Path) -> TrainConfig:
        """The run of `preset` on `manifests` (train, val; "text", when present, is added
        `text_weight` times per epoch)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown adapter preset {preset!r}; choose from {sorted(PRESETS)}")
        every = max(1, self.steps // self.checkpoints)
        text = f",{manifests['text']}*{self.text_weight}" if "text" in manifests else ""
        return TrainConfig(
            train_manifest=f"{manifests['train']}{text}",
            val_manifest=str(manifests["val"]),
            output_dir=str(run_dir),
            feature_cache=str(Path(manifests["train"]).parent / "features"),
            model=ModelConfig(
                encoder=self.encoder,
                adapter=preset,
                audio_dim=self.audio_dim,
                semantic_codes=self.semantic_codes,
                tiny_llm_hidden=self.llm_hidden,
                tiny_llm_layers=self.llm_layers,
                adapter_backend=self.backend,
                expert_init=self.expert_init,
            ),
            seed=self.seed,
            bf16=self.bf16,
            fp16=self.fp16,
            max_steps=self.steps,
            lr=self.lr,
            warmup_steps=max(1, self.steps // 20),
            decay_fraction=0.2,
            max_batch_size=self.batch_size,
            max_batch_tokens=self.batch_size * 160,
            aux_lambda=self.aux_lambda,
            router_lr_scale=self.router_lr_scale,
            eval_every=every,
            save_every=every,
            keep_checkpoints=self.checkpoints + 1,
            full_checkpoints=1,
            progress=not self.quiet,
            resume=self.resume,
            overwrite=not self.resume,  # a rerun trains afresh unless asked to resume
        )


def read_log(run_dir: Path) -> list[dict]:
    return [record for _, record in log_lines(Path(run_dir) / "log.jsonl")]


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
    The evaluation is also written to the run folder's eval.json. With `exp.resume`, a run that had
    finished and been evaluated before this call keeps its evaluation and its training time."""
    run_dir = Path(exp.out) / (name or preset)
    done, timing = run_dir / "eval.json", run_dir / "train_seconds.json"
    final = run_dir / "checkpoints" / f"step_{exp.steps:07d}"
    finished = exp.resume and done.is_file() and final.is_dir()
    if not exp.resume:  # a fresh run: an earlier run's evaluation must not outlive it
        done.unlink(missing_ok=True)
    cfg = exp.train_config(preset, manifests, run_dir)
    if adjust is not None:
        cfg = adjust(cfg)
    if finished and timing.is_file():
        diffs = config_differences(json.loads((run_dir / "config.json").read_text()), cfg)
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
    earlier = json.loads(timing.read_text())["seconds"] if exp.resume and timing.is_file() else 0.0
    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except Stopped:
        timing.write_text(json.dumps({"seconds": earlier + time.perf_counter() - t0}))
        raise
    seconds = time.perf_counter() - t0
    print(f"{name or preset}: at step {exp.steps}, {seconds:.0f} s in this call", flush=True)
    seconds += earlier
    timing.write_text(json.dumps({"seconds": seconds}))
    model = load_trained(run_dir, device=default_device())  # where train() ran it
    result = evaluate(model, read_manifest(manifests["test"]), run_features(run_dir, model), seed=exp.seed)
    done.write_text(json.dumps(result, indent=1))
    return {"eval": result, "summary": summary, "log": read_log(run_dir), "seconds": seconds}


def add_experiment_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """ExperimentConfig's fields as flags (`--steps`, `--audio-dim`, ...); `defaults` override theirs."""
    add_dataclass_args(parser, ExperimentConfig, defaults=defaults)


def experiment_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return dataclass_from_args(ExperimentConfig, args)
