"""Train the reference LALM: `python -m adapter.lalm.train --help` (or under torchrun: DDP, or FSDP2 with --fsdp).

Loss (eq. 6): next-token cross-entropy on the answer tokens + lambda * the adapters' balance
losses. One optimizer step consumes `grad_accum x world` micro-batches; every micro-batch's
cross-entropy is divided by the answer tokens of the whole step and its balance loss by the number
of micro-batches that ran the adapters (text-only ones do not), so lambda means the same whatever
the text/audio mix, and a step on R processes equals a step on one process that accumulates the
same micro-batches (tests/adapter/lalm/test_train.py checks it with 2 processes on gloo, with
text-only micro-batches on one rank; test_train_fsdp.py the same under --fsdp). With
--balance-scope global the balance loss of each micro-batch index is taken over all R ranks'
tokens together (adapter/distributed.py). The log's `aux` is the unweighted L_aux (null on a step
without audio), `aux_weighted` what entered the loss before lambda.

Data parallelism: DDP (the default) keeps a full copy of the model and optimizer on every
process; --fsdp shards them (adapter/lalm/parallel.py), reduces gradients once per step (not per
micro-batch), and clips and checks for non-finite values on the norm over all shards.

A run folder holds one run: a fresh run refuses a folder that holds one (unless --overwrite), a
--resume refuses a configuration that differs from the saved one except in logging, evaluation
and checkpoint cadence (and grad_accum where grad_accum x processes is unchanged), and nothing but
the folder's lock file is written before these checks pass. A folder in which a run is training is
refused, naming its process (`RunFolderLock`: a lock the OS drops when that process ends, however
it ends). Loading is strict.

Checkpoints hold what trains (safetensors; with --fsdp, torch.distributed.checkpoint shards that
any number of processes reads), the optimizer, the schedule, the data position and every RNG
state; they are assembled in a temporary folder and renamed into place, so a run killed at any
instant (SIGKILL included) resumes from its last checkpoint and continues with the same losses it
would have logged uninterrupted, on the same or another number of processes. SIGTERM or Ctrl-C
(SIGINT) stops a run cleanly: the step in progress finishes, every rank saves a checkpoint of it and
the program exits 128 + the signal (143, 130) naming the folder; a second signal stops at once.
Under torchrun the launcher passes its SIGTERM on to the workers and kills them 30 s later (torch's
shutdown timeout), so a save longer than that leaves the previous checkpoint the newest. A step
whose loss or gradient is not finite is skipped on every rank, counted and logged; it never reaches
the weights.

Precision: bf16 autocast on CUDA (the default, sm_80 on); --fp16 for GPUs without bf16 (T4, V100):
fp16 autocast with a dynamic loss scale (torch.amp.GradScaler), where a step whose scaled gradients
overflow on any rank is such a skipped step and halves the scale on every rank (logged as
loss_scale; the checkpoints carry it); --no-bf16 trains in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from adapter.cli import Stopped, add_note, run_cli, stop_requests
from adapter.files import atomic_write_text, fsync_write
from adapter.lalm import parallel
from adapter.lalm.build import build_model
from adapter.lalm.config import ModelConfig, TrainConfig, train_config_from_argv
from adapter.lalm.data import (
    BatchStream,
    DataPosition,
    Example,
    FeatureSource,
    collate,
    distinct_clips,
    length_batches,
    read_manifests,
)
from adapter.lalm.model import AudioLLM
from adapter.stats import moe_adapters

# ------------------------------------------------------------------------------ setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """Where a tool runs a trained model when not told: the GPU training would use, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    """The `--device` of a tool that runs a trained model (evaluate, analysis, diagnose): None is
    default_device(); a device this torch cannot use is refused (ValueError) before any loading."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
    return device


def add_device_flag(parser) -> None:
    """`--device` for a tool that runs a trained model; read it back with device_from_flag."""
    parser.add_argument(
        "--device", help="where the model runs: cpu, cuda, cuda:1, ... (default: the GPU when there is one, else cpu)"
    )


def device_from_flag(parser, args) -> torch.device:
    """The parsed `--device` (resolve_device); one this torch cannot use is a usage error."""
    try:
        return resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device): under torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def trainable_names(model: AudioLLM, cfg: TrainConfig) -> set[str]:
    """Names of the parameters `cfg` trains (what a checkpoint's model.safetensors holds, with the
    semantic codebook)."""
    parts = []
    if cfg.train_adapter:
        parts += ["adapter", "fusion", "semantic_embed"]
    if not cfg.freeze_encoder:
        parts.append("encoder")
    if not cfg.freeze_llm:
        parts.append("llm")
    return {n for n, _ in model.named_parameters() if n.split(".", 1)[0] in parts}


def set_trainable(model: AudioLLM, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    names = trainable_names(model, cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: AudioLLM, params: list[torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """One AdamW group for everything but the MoE routers, whose learning rate is lr x
    router_lr_scale (the schedule's multiplier applies to both); a single group when the scale is
    1, the layout of runs from before the option (their optimizer state then still loads)."""
    if cfg.router_lr_scale == 1.0:
        return [{"params": params}]
    routers = {id(m.router.weight) for m in moe_adapters(model)}
    groups = [
        {"params": [p for p in params if id(p) not in routers]},
        {"params": [p for p in params if id(p) in routers], "lr": cfg.lr * cfg.router_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def wsd_schedule(cfg: TrainConfig):
    """Warmup-Stable-Decay (Wen et al. 2024): linear warmup, flat, linear decay over the last
    `decay_fraction` of the steps to `min_lr_ratio` of the peak. A multiplier of the peak lr."""
    decay_start = cfg.max_steps - int(round(cfg.decay_fraction * cfg.max_steps))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if step < decay_start:
            return 1.0
        frac = (step - decay_start + 1) / max(1, cfg.max_steps - decay_start)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * min(1.0, frac)

    return factor


# ------------------------------------------------------------------------------ checkpoints


def trainable_state(model: AudioLLM) -> dict[str, torch.Tensor]:
    """Trainable parameters plus the fitted semantic codebook: everything a rebuild cannot redraw."""
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if model.semantic is not None:
        state["semantic.codebook"] = model.semantic.codebook.detach().cpu()
        state["semantic.fitted"] = model.semantic.fitted.detach().cpu()
    return state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


STEP_NAME = re.compile(r"step_\d{7}")  # a checkpoint folder (not step_0000004.bad, set aside by hand)


def step_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (a run's checkpoints/), oldest first."""
    return sorted(p for p in root.glob("step_*") if STEP_NAME.fullmatch(p.name) and p.is_dir())


class Checkpointer:
    """checkpoints/step_NNNNNNN/ and checkpoints/latest naming the newest; both replaced atomically.

    A step folder holds {model.safetensors, optimizer.pt, rng.pt} (one process or DDP: rank 0
    writes) or, `sharded` (FSDP), dcp/ with every rank's shards and rng_<rank>.pt (every rank
    writes, adapter/lalm/parallel.py); then scheduler.pt and state.json. It is assembled in a
    temporary folder that only a complete save renames into place, so a crash (SIGKILL included)
    at any instant leaves the last complete checkpoint the newest; a save that raises (a full disk)
    also removes its partial folder and adds a note naming the checkpoint that stands. With `full`
    > 0 (not sharded) only the newest `full` keep optimizer.pt; the older ones keep the rest."""

    def __init__(self, root: Path, keep: int, sharded: bool = False, full: int = 0) -> None:
        self.root = root / "checkpoints"
        self.keep = keep
        self.sharded = sharded
        self.full = full

    def save(
        self, step: int, model: AudioLLM, optimizer, scheduler, scaler, state: dict, rank: int = 0, world: int = 1
    ) -> Path:
        """Every rank calls it (a collective when sharded). An enabled loss scaler (--fp16) is saved
        in state.json under "scaler"."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp_step_{step:07d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier(world)
        try:
            if self.sharded:
                parallel.save_sharded(tmp, model, optimizer, _checkpoint_names(model, trained_now(model)))
                torch.save(_rng_state(), tmp / f"rng_{rank}.pt")
            elif rank == 0:
                save_file(trainable_state(model), str(tmp / "model.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(_rng_state(), tmp / "rng.pt")
            _barrier(world)
            if rank == 0:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                if scaler is not None and scaler.is_enabled():
                    state = {**state, "scaler": scaler.state_dict()}
                fsync_write(tmp / "state.json", json.dumps(state, indent=1).encode())
                if final.exists():  # the same step saved again (after a resume): identical content
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except Exception as exc:
            # A full disk is the usual cause: give back what the partial save took, and say what stands.
            shutil.rmtree(tmp, ignore_errors=True)
            newest = self.latest()
            add_note(
                exc,
                f"checkpoint {final.name} was not saved (its partial folder {tmp} is removed); the newest "
                + (f"complete checkpoint, {newest}, stands: --resume continues from it" if newest else "run has none"),
            )
            raise
        if rank == 0:
            atomic_write_text(self.root / "latest", final.name)
            for old in step_folders(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            if self.full and not self.sharded:  # the newest `full` stay whole: a resume reads the newest
                for old in step_folders(self.root)[: -self.full]:
                    (old / "optimizer.pt").unlink(missing_ok=True)
        _barrier(world)
        return final

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        done = step_folders(self.root)
        return done[-1] if done else None


def checkpoint_disk_shortfall(out_dir: Path, trained: int, keep: int, existing: int = 0, full: int = 0) -> str | None:
    """What to tell the user when `out_dir`'s file system has less free space than the run's
    checkpoints take at their peak (`keep` kept plus the one being saved, less the `existing` ones a
    resume finds, which the free space already excludes); None when it has enough.
    Estimated from the `trained` parameter count: an fp32 weight and AdamW's two fp32 moments,
    12 bytes each, or the weight alone, 4, in a checkpoint beyond the newest `full` (0: all full)
    (the checkpoints of the CI-size LALM: 13.4 MB of weights, 26.8 MB of optimizer state). Said
    before the first step, not hours later when a save fails on a full disk."""
    whole = min(full or keep, keep)  # kept checkpoints with the optimizer state

    def size(count: int) -> int:  # the newest `count` of the kept checkpoints
        return (12 * min(count, whole) + 4 * max(0, count - whole)) * trained

    need = max(0, size(keep) + 12 * trained - size(existing))
    free = shutil.disk_usage(out_dir).free
    if free >= need:
        return None
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    return (
        f"{out_dir} has {gb(free)} free, but this run's checkpoints need about {gb(need)} more ({keep} kept, "
        f"{whole} with the optimizer state, + the one being saved - {existing} there; {gb(12 * trained)} with it, "
        f"{gb(4 * trained)} without, for {trained:,} trained parameters): free some space, keep fewer "
        "(--keep-checkpoints, --full-checkpoints; the experiment runners' --checkpoints) or choose another "
        "--output-dir"
    )


class RunFolderLock:
    """<run folder>/.lock, held (flock) while a run trains there: a second run in the folder (another
    terminal, a requeued job whose predecessor still runs) is refused by name instead of mixing its
    checkpoints and log lines with the first. The OS drops the lock when its process ends, however
    it ends (SIGKILL included), so no stale lock outlives a crash; the file stays, emptied."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / ".lock"
        self._fh = None

    def acquire(self) -> str | None:
        """None once this process holds the lock; otherwise who holds it."""
        if self._fh is not None:
            return None
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            warnings.warn("no fcntl on this platform: nothing stops a second run in this folder", stacklevel=3)
            return None
        fh = open(self.path, "a+")  # noqa: SIM115 (held open until release)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            return holder
        except OSError as exc:  # a file system without locks (some network mounts): run unguarded
            fh.close()
            warnings.warn(f"cannot lock {self.path} ({exc}): nothing stops a second run in this folder", stacklevel=3)
            return None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return None

    def release(self) -> None:
        if self._fh is not None:
            self._fh.truncate(0)  # still locked: nobody reads a holder that has gone
            self._fh.close()
            self._fh = None


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def trained_now(model: AudioLLM) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint_names(model: AudioLLM, trained: set[str]) -> set[str]:
    semantic = {"semantic.codebook", "semantic.fitted"} if model.semantic is not None else set()
    return trained | semantic


def load_trainable(model: AudioLLM, path: Path, trained: set[str]) -> None:
    """Load a checkpoint's model.safetensors into a model built from the same ModelConfig. Strict:
    the file must hold exactly the `trained` parameters (and the semantic codebook), each of the
    model's shape; anything else names the run that does not match and the tensors that differ."""
    expected = _checkpoint_names(model, trained)
    if parallel.is_sharded(path):
        file = path / parallel.DCP_DIR
        held = parallel.sharded_model_names(path)
        tensors = parallel.load_sharded_model(path, model, expected & held) if held == expected else {}
    else:
        file = path / "model.safetensors"
        try:
            tensors = load_file(str(file))
        except Exception as exc:
            raise _damaged(file, exc) from exc
        held = set(tensors)
    missing, unexpected = sorted(expected - held), sorted(held - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {file} does not match the model built from the run's config: "
            f"missing {len(missing)} tensor(s) {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]} "
            "(was the run trained with another adapter, model or freeze setting?)"
        )
    state = model.state_dict()
    wrong = [
        f"{n}: file {tuple(t.shape)}, model {tuple(state[n].shape)}"
        for n, t in tensors.items()
        if tuple(t.shape) != tuple(state[n].shape)
    ]
    if wrong:
        raise ValueError(f"checkpoint {file} does not match the model's shapes: {wrong[:5]}")
    model.load_state_dict(tensors, strict=False)  # the frozen rest is rebuilt from the seed


def load_checkpoint(path: Path, model: AudioLLM, optimizer, scheduler, rank: int = 0) -> dict:
    """Resume state from a checkpoint of either format, written by any number of processes. A
    rank without an RNG file of its own (more processes than wrote it) takes rank 0's; the
    training loop draws no random numbers, so the losses do not depend on it."""
    if parallel.is_sharded(path):
        names = _checkpoint_names(model, trained_now(model))
        held = parallel.sharded_model_names(path)
        if held != names:
            raise ValueError(
                f"checkpoint {path} does not match the model built from the run's config: missing "
                f"{sorted(names - held)[:5]}, unexpected {sorted(held - names)[:5]}"
            )
        parallel.load_sharded(path, model, optimizer, names)
        rng = path / f"rng_{rank}.pt"
        rng = rng if rng.is_file() else path / "rng_0.pt"
    else:
        if not (path / "optimizer.pt").is_file():
            earlier = _resumable_before(path)
            way = f"move it out of {path.parent}, and --resume continues from {earlier}" if earlier else "--overwrite"
            raise ValueError(
                f"checkpoint {path} keeps the weights only (--full-checkpoints kept the optimizer state in the "
                f"newest checkpoints alone), so a run cannot resume from it: {way}"
            )
        load_trainable(model, path, trained_now(model))
        optimizer.load_state_dict(_read_checkpoint_file(path / "optimizer.pt"))
        rng = path / "rng.pt"
    scheduler.load_state_dict(_read_checkpoint_file(path / "scheduler.pt"))
    _set_rng_state(_read_checkpoint_file(rng))
    return _read_checkpoint_file(path / "state.json")


def _read_checkpoint_file(file: Path):
    """A checkpoint's .pt or .json file; a damaged one (copied in part, a failing disk: saves are
    atomic) is named, with the way back to the checkpoint before it."""
    try:
        if file.suffix == ".json":
            return json.loads(file.read_text())
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _damaged(file, exc) from exc


def _resumable_before(step: Path) -> str | None:
    """The newest checkpoint older than `step` that a run can resume from (not a weights-only one)."""
    whole = [p.name for p in step_folders(step.parent) if p.name < step.name]
    whole = [n for n in whole if parallel.is_sharded(step.parent / n) or (step.parent / n / "optimizer.pt").is_file()]
    return whole[-1] if whole else None


def _damaged(file: Path, exc: Exception) -> ValueError:
    step = file.parent
    earlier = _resumable_before(step)
    way_back = (
        f"delete {step} or move it out of {step.parent}, and --resume continues from {earlier}"
        if earlier
        else "no earlier checkpoint a run can resume from exists: start afresh (--overwrite)"
    )
    return ValueError(f"cannot read the checkpoint file {file} ({type(exc).__name__}: {exc}); {way_back}")


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_loss(model: AudioLLM, examples: list[Example], source: FeatureSource, cfg: TrainConfig, device) -> dict:
    """Teacher-forced next-token loss on held-out examples (answer tokens only)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    batches = length_batches(
        examples,
        model.tokenizer,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        seed=0,
        epoch=0,
    )
    for idx in batches:
        batch = collate([examples[i] for i in idx], model.tokenizer, source).to(device)
        with _autocast(device, cfg):
            out = model(batch)
        total += float(out.ntp_sum)
        tokens += out.num_tokens
    model.train(was_training)
    return {"val_loss": total / max(tokens, 1), "val_tokens": tokens}


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """What the forward computes in under autocast, or None (fp32): fp16 where asked (on any device:
    it is opt-in), else bf16 on CUDA (the default; ignored on CPU, where it is the slower choice)."""
    if cfg.fp16:
        return torch.float16
    return torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None


def _autocast(device, cfg: TrainConfig):
    dtype = compute_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------ training


def _feature_memory_warning(cfg: TrainConfig, examples: list[Example], model: AudioLLM, world: int) -> str | None:
    """Without --feature-cache every process encodes every clip and keeps all features in memory:
    said when there are several processes, or when that memory is over half of this machine's."""
    if cfg.feature_cache:
        return None
    frames = sum(ex.num_frames for ex in distinct_clips(examples))
    per_process = 4 * model.encoder.stacked_dim * frames
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if world == 1 and not (ram and per_process > ram / 2):
        return None
    return (
        f"the frozen encoder's features of {frames} frames take {per_process / 2**30:.1f} GiB in memory in each of "
        f"the {world} process(es), every one encoding every clip: --feature-cache DIR (on a filesystem they all "
        "share) keeps them on disk instead, each clip encoded once"
    )


def fit_semantic(
    model: AudioLLM, examples: list[Example], source: FeatureSource, seed: int, max_frames: int = 20000
) -> None:
    """Fit the frozen k-means codebook on (a seeded sample of) the training frames (through the
    encoder at its initial weights when the source feeds mels to a trainable encoder). The sample
    is the rows randperm picks from all clips' frames in order, gathered clip by clip: the frames
    of every clip are never in memory at once."""
    if source.encoder is None:
        source = FeatureSource(source.n_mels, encoder=model.encoder, cache=False)
    audio = [ex for ex in examples if ex.audio is not None]
    if not audio:
        raise ValueError("semantic_codes > 0 needs audio examples to fit the codebook; the training set has none")
    total = sum(ex.num_frames for ex in audio)  # the headers' count: each clip's features have that many rows
    if total <= max_frames:
        model.semantic.fit(torch.cat([source.features(ex) for ex in audio]), seed=seed)
        return
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_frames]
    frames = torch.tensor([ex.num_frames for ex in audio])
    starts = frames.cumsum(0) - frames
    clip_of = torch.searchsorted(starts, pick, right=True) - 1  # the clip each picked row lies in
    by_clip = torch.argsort(clip_of, stable=True)  # sample positions grouped by clip: one pass over the picks
    feats, first = None, 0
    for clip, count in zip(*torch.unique_consecutive(clip_of[by_clip], return_counts=True), strict=True):
        ex, mine = audio[int(clip)], by_clip[first : first + int(count)]
        first += int(count)
        rows = source.features(ex)
        if rows.shape[0] != ex.num_frames:
            raise ValueError(f"{ex.audio}: its header gives {ex.num_frames} frames, the encoder {rows.shape[0]}")
        feats = feats if feats is not None else rows.new_empty(max_frames, rows.shape[1])
        feats[mine] = rows[pick[mine] - starts[clip]]
    model.semantic.fit(feats, seed=seed)


def log_lines(path: Path, fix: str = "fix or remove the line") -> list[tuple[str, dict]]:
    """(line, record) for each line of a run's log.jsonl, in order. A torn final line (a crash in
    mid-append, or a run appending it right now) is left out, saying so on stderr; a bad line
    before the last one is an error naming file:line and `fix`."""
    numbered = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    out = []
    for i, (lineno, ln) in enumerate(numbered):
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError as exc:
            if i == len(numbered) - 1:
                print(f"{path}: left out a torn last line (a crash, or a run writing it now)", file=sys.stderr)
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc}); {fix}") from exc
    return out


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint a run resumes from (they will be redone), and a
    torn final line (a crash in mid-append); a bad line before the last one is an error."""
    if not path.is_file():
        return
    keep = [
        ln for ln, record in log_lines(path, "fix or remove the line to resume") if record.get("step", 0) <= last_step
    ]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# Fields a resumed run may change: they steer logging, evaluation and checkpoint cadence, not what
# is trained or in which order.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "overwrite",
        "progress",
        "output_dir",
        "log_every",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "full_checkpoints",
        "feature_cache",
        "activation_checkpointing",  # recomputes the same values: the same losses either way (tested)
    }
)


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """'field: saved -> now' for every field of `cfg` outside RESUMABLE_CHANGES that differs from a
    run's saved config.json (model fields as model.<name>)."""
    now = dataclasses.asdict(cfg)
    # A field the saved config lacks was added later; that run ran with its default.
    saved = {**dataclasses.asdict(TrainConfig()), **saved}
    saved["model"] = {**dataclasses.asdict(ModelConfig()), **(saved.get("model") or {})}
    diffs = []
    for name in sorted(set(now) | set(saved)):
        if name in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(name), now.get(name)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            diffs += [
                f"model.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


def _check_run_folder(cfg: TrainConfig, out_dir: Path, previous: Path | None, world: int = 1) -> None:
    """Refuse, before anything is written, a run that would mix with the one already in out_dir.
    A resume may change grad_accum when the micro-batches per step (grad_accum x processes) stay."""
    if previous is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"{out_dir} already holds a run ({previous.name}); pass --resume to continue it or "
            "--overwrite to start afresh"
        )
    saved_cfg = out_dir / "config.json"
    if cfg.resume and previous is not None and saved_cfg.is_file():
        saved = json.loads(saved_cfg.read_text())
        state = _read_checkpoint_file(previous / "state.json")
        per_step = state.get("micro_batches_per_step", saved.get("grad_accum", 1) * world)
        if per_step != cfg.grad_accum * world:
            raise ValueError(
                f"--resume: a step of the run in {out_dir} consumed {per_step} micro-batches; --grad-accum "
                f"{cfg.grad_accum} on {world} process(es) gives {cfg.grad_accum * world}: pass "
                f"--grad-accum {per_step // world}" + ("" if per_step % world == 0 else f" on a divisor of {per_step}")
            )
        diffs = [d for d in config_differences(saved, cfg) if not d.startswith("grad_accum:")]
        if diffs:
            raise ValueError(
                f"--resume: the configuration differs from the run in {out_dir} ({'; '.join(diffs)}); "
                "resume with the run's own config (--config " + str(saved_cfg) + ") or start afresh elsewhere"
            )


def enable_activation_checkpointing(llm) -> None:
    """Recompute each decoder layer of a transformers LLM in backward. Non-reentrant: the
    reentrant form runs the layer without gradients and loses the gradient of anything read beside
    its output (and needs an input that requires grad: not so with a frozen embedding)."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _clear_adapter_stats(adapters) -> None:
    """Forget the last forward's routing statistics, so a micro-batch that never runs an adapter
    (text only) is not credited with the previous one's."""
    for a in adapters:
        a.aux_loss = a.expert_counts = a.last_topk_idx = None


def _stop(ckpt: Checkpointer, state: dict, saved_step, objects, rank, world, signals) -> None:
    """A stop asked for by a signal, at a step boundary: save the steps done (every rank takes part),
    then raise `Stopped`. A step already saved (or a run stopped before its first step) saves nothing."""
    step = state["step"]
    if step and step != saved_step:
        where = ckpt.save(step, *objects, state, rank, world)
        done = f"after step {step}; saved {where}; add --resume to the same command to continue"
    elif step:
        done = f"after step {step}, which {ckpt.root} already holds; add --resume to the same command to continue"
    else:
        done = "before its first step: nothing to save"
    if world > 1:
        dist.destroy_process_group()
    if signals:
        raise Stopped(f"training stopped by {signal.Signals(signals[0]).name} {done}", signals[0])
    raise Stopped(f"training stopped by a signal to another process {done}", signal.SIGTERM)


def _refuse_if_busy(busy: str | None, out_dir: Path, world: int, device) -> None:
    """Every rank raises, or none: only rank 0 knows who holds the folder's lock."""
    refused = torch.tensor([int(busy is not None)], device=device)
    if world > 1:
        dist.all_reduce(refused)
    if refused.item():
        raise ValueError(
            f"{out_dir} is in use by another training run ({busy or 'rank 0 found it locked'}); wait "
            "for it to end, stop it, or train elsewhere (--output-dir)"
        )


def bf16_refusal(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why bf16 autocast cannot train on `device`, or None. Below sm_80 (T4, V100) a GPU has no bf16
    hardware: torch.cuda.is_bf16_supported() still says True there (it tests that a bf16 tensor can
    be made), but matmuls run emulated and cuDNN has no bf16 convolutions; the narrower question is
    is_bf16_supported(including_emulation=False)."""
    if compute_dtype(cfg, device) != torch.bfloat16 or torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"--bf16 (the default) on {torch.cuda.get_device_name(device)} (sm_{major}{minor}), which has no bf16 "
        "hardware (sm_80 on): torch would emulate bf16 matmuls at fp32 speed or below and cuDNN has no bf16 "
        "convolutions there; pass --fp16 (fp16 autocast with a loss scale, the tensor cores' format there) or "
        "--no-bf16 (fp32)"
    )


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary (steps, skipped steps, last losses)."""
    out_dir = Path(cfg.output_dir)
    lock = RunFolderLock(out_dir)
    try:
        return _train(cfg, out_dir, lock)
    finally:  # however training ends, in this process too (a caller may train in the folder again)
        lock.release()


def _train(cfg: TrainConfig, out_dir: Path, lock: RunFolderLock) -> dict:
    rank, world, device = distributed()
    if reason := bf16_refusal(cfg, device):
        raise ValueError(reason)
    is_main = rank == 0
    # Rank 0 locks a folder that exists before reading what it holds (it may be training there now).
    busy = lock.acquire() if is_main and out_dir.is_dir() else None
    _refuse_if_busy(busy, out_dir, world, device)
    ckpt = Checkpointer(out_dir, cfg.keep_checkpoints, sharded=cfg.fsdp, full=cfg.full_checkpoints)
    previous = ckpt.latest()
    _check_run_folder(cfg, out_dir, previous, world)
    train_examples = read_manifests(cfg.train_manifest)
    if not train_examples:
        raise ValueError(f"the training manifest(s) {cfg.train_manifest!r} hold no examples")
    val_examples = read_manifests(cfg.val_manifest) if cfg.val_manifest else []
    seed_everything(cfg.seed)
    model = build_model(cfg.model, seed=cfg.seed).to(device)
    params = set_trainable(model, cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.llm)
    # Every rank runs the adapter on every micro-batch (zero frames when text-only): FSDP units
    # and a global balance loss hold collectives in forward.
    model.run_audio_path_always = world > 1
    # Everything is checked: only now does the run touch its folder.
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        busy = lock.acquire()
        if busy is None and ckpt.latest() != previous:  # a run that made the folder since the checks
            busy = "a run that started there meanwhile"
    _refuse_if_busy(busy, out_dir, world, device)  # also holds every rank here until rank 0 is done
    latest = previous if cfg.resume else None
    if is_main:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(ckpt.root, ignore_errors=True)
        if latest is None:  # a fresh start: no earlier log lines may survive
            (out_dir / "log.jsonl").unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.json", cfg.to_json())
    source = FeatureSource(
        model.encoder.dims.n_mels,
        encoder=model.encoder if cfg.freeze_encoder else None,
        cache_dir=cfg.feature_cache or None,
    )
    if cfg.freeze_encoder:
        model.encoder.eval()
        heard = train_examples + val_examples
        if is_main and (warning := _feature_memory_warning(cfg, heard, model, world)):
            warnings.warn(warning, stacklevel=3)
        source.precompute(heard, progress=cfg.progress and is_main, rank=rank, world=world)
        if cfg.feature_cache:
            _barrier(world)  # every process's share is on disk before any reads them
    if latest is None and model.semantic is not None:
        fit_semantic(model, train_examples, source, cfg.seed)  # before sharding: it may run the encoder
    sharded = cfg.fsdp and world > 1
    if sharded:
        parallel.shard_model(model, compute_dtype(cfg, device))
        params = [p for p in model.parameters() if p.requires_grad]  # now sharded DTensors
    optimizer = torch.optim.AdamW(
        param_groups(model, params, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, wsd_schedule(cfg))
    # fp16: the loss is scaled before backward so small gradients do not flush to zero; a step whose
    # scaled gradients overflow is skipped and halves the scale, and 2000 clean steps double it
    # (GradScaler's defaults). Disabled (bf16, fp32), it passes everything through unchanged.
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.fp16_init_scale, enabled=cfg.fp16)
    if is_main:
        trained, there = sum(p.numel() for p in params), len(step_folders(ckpt.root))
        if short := checkpoint_disk_shortfall(out_dir, trained, cfg.keep_checkpoints, there, cfg.full_checkpoints):
            warnings.warn(short, stacklevel=3)
    per_step = cfg.grad_accum * world
    state = {
        "step": 0,
        "skipped": 0,
        "position": dataclasses.asdict(DataPosition()),
        "micro_batches_per_step": per_step,
    }
    if world > 1:
        dist.barrier()
    if latest is not None:
        if model.semantic is not None:
            model.semantic.fitted.fill_(True)  # the codebook comes from the checkpoint
        state = {**load_checkpoint(latest, model, optimizer, scheduler, rank), "micro_batches_per_step": per_step}
        if cfg.fp16:  # checkpointed with the step: a resume continues at the same scale
            scaler.load_state_dict(state.pop("scaler"))
        if is_main:
            _truncate_log(out_dir / "log.jsonl", state["step"])
            print(f"resumed from {latest} at step {state['step']}", flush=True)

    stream = BatchStream(
        train_examples,
        model.tokenizer,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        seed=cfg.seed,
        per_step=per_step,
        rank=rank,
        world=world,
        position=DataPosition(**state["position"]),
    )
    net = model
    if world > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    model.train()
    if cfg.freeze_encoder:
        model.encoder.eval()
    adapters = moe_adapters(model.adapter)
    log_path = out_dir / "log.jsonl"
    summary: dict = {}
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc="train",
        disable=not (cfg.progress and is_main),
        file=sys.stdout,
    )
    audio_pad = model.tokenizer.audio_pad_id
    global_scope = world > 1 and bool(adapters) and cfg.model.balance_scope == "global"
    # Tracked, not read from the folder: every rank must agree whether a stop saves (a collective
    # when sharded), and under DDP only rank 0 writes checkpoints that other nodes may not see.
    saved_step = state["step"] if latest is not None else None
    with stop_requests(announce=is_main) as stop_signals:  # SIGINT/SIGTERM: save, then stop
        while state["step"] < cfg.max_steps:
            t0 = time.perf_counter()
            micro = [collate(b, model.tokenizer, source).to(device) for b in stream.next_step()]
            counts = [
                len(stop_signals),  # a stop asked of any rank stops every rank at this step boundary
                sum(int((b.labels_BL[:, 1:] != -100).sum()) for b in micro),
                sum(int(b.attention_mask_BL.sum()) for b in micro),
                *(int(bool((b.input_ids_BL == audio_pad).any())) for b in micro),  # which micro-batches hold audio
            ]
            counts = torch.tensor(counts, device=device)
            if world > 1:
                dist.all_reduce(counts)
            if int(counts[0]):
                bar.close()
                _stop(ckpt, state, saved_step, (model, optimizer, scheduler, scaler), rank, world, stop_signals)
            n_answer, n_positions = int(counts[1]), int(counts[2])
            ranks_with_audio = [int(c) for c in counts[3:]]  # per micro-batch index, over the ranks
            n_audio = sum(ranks_with_audio)
            # The balance loss is a mean over the micro-batches that ran the adapters, so lambda means the
            # same whatever share of the step is text-only. Local scope: one loss per (rank, micro-batch).
            # Global scope: one per micro-batch index, over all ranks' tokens; each rank's copy carries R x
            # its share of the gradient (adapter/distributed.py), hence the extra 1/R.
            n_aux = sum(1 for c in ranks_with_audio if c) if global_scope else n_audio
            aux_div = n_aux * world if global_scope else n_audio
            ntp_sum, aux_sum, raw_aux_sum = 0.0, 0.0, 0.0
            loads = [torch.zeros(a.config.num_experts, device=device) for a in adapters]
            for i, batch in enumerate(micro):
                _clear_adapter_stats(adapters)
                last = i == len(micro) - 1
                sync = contextlib.nullcontext() if (world == 1 or last or sharded) else net.no_sync()
                if sharded:  # reduce-scatter the gradients once per step, after the last micro-batch
                    model.set_requires_gradient_sync(last)
                with sync, _autocast(device, cfg):
                    out = net(batch)
                    loss = out.ntp_sum / max(n_answer, 1)
                    if out.aux_loss is not None and cfg.aux_lambda:
                        loss = loss + cfg.aux_lambda * out.aux_loss / aux_div
                    scaler.scale(loss * world).backward()  # DDP and FSDP average over ranks: undo it
                ntp_sum += float(out.ntp_sum.detach())
                if out.aux_loss is None:  # text only: the adapter ran on zero frames, or not at all
                    continue
                # A global loss is the same on every rank that holds audio: count it once in the log.
                share = 1.0 / ranks_with_audio[i] if global_scope else 1.0
                aux_sum += share * float(out.aux_loss.detach())
                for load, a in zip(loads, adapters, strict=True):
                    load += a.expert_counts.to(load)
                    raw_aux_sum += share * float(a.aux_loss.detach())
            stats = torch.tensor([ntp_sum, aux_sum, raw_aux_sum], device=device, dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stats)
                for load in loads:
                    dist.all_reduce(load)
            loss_scale = scaler.get_scale() if cfg.fp16 else None
            scaler.unscale_(optimizer)  # the true gradients, for the norm, the clip and the finite check
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
            ntp = float(stats[0]) / max(n_answer, 1)
            # aux: the adapters' balance losses as they enter the loss (each times its aux_loss_weight);
            # aux_raw: unweighted L_aux (eq. 10), logged even when its weight is 0 ("w/o EBL").
            aux = float(stats[1]) / n_aux if n_aux else 0.0
            aux_raw = float(stats[2]) / n_aux if n_aux and adapters else None
            finite = (
                math.isfinite(ntp)
                and math.isfinite(aux)
                and (aux_raw is None or math.isfinite(aux_raw))
                and bool(torch.isfinite(grad_norm))
            )
            if finite:
                scaler.step(optimizer)  # fp16: the gradients are finite, so it steps
            else:
                state["skipped"] += 1
            scaler.update()  # fp16: an overflow (the unscale's finite check, over all ranks) halves the scale
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():
                # A skipped step still advances the schedule (the step count does); where the very first
                # step is skipped torch warns of a scheduler step before any optimizer step: intended.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                scheduler.step()
            state["step"] += 1
            state["position"] = dataclasses.asdict(stream.position)
            dt = time.perf_counter() - t0
            step = state["step"]
            record = {
                "step": step,
                "loss": ntp + cfg.aux_lambda * aux,
                "ntp": ntp,
                "aux": aux_raw,
                "aux_weighted": aux if n_audio else None,
                "audio_batches": n_audio,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "answer_tokens": n_answer,
                "tokens_per_s": n_positions / dt,
                "skipped": not finite,
                "skipped_total": state["skipped"],
            }
            if cfg.fp16:
                record["loss_scale"] = loss_scale
            for k, load in enumerate(loads):  # null on a step whose micro-batches were all text-only
                total = load.sum()
                record[f"expert_load_{k}"] = [round(v, 4) for v in (load / total).tolist()] if total > 0 else None
            # FSDP: every rank takes part in every forward (each all-gathers), so every rank evaluates.
            if cfg.eval_every and step % cfg.eval_every == 0 and val_examples and (is_main or sharded):
                record.update(evaluate_loss(model, val_examples, source, cfg, device))
            if is_main and (step % cfg.log_every == 0 or not finite or "val_loss" in record):
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                ckpt.save(step, model, optimizer, scheduler, scaler, state, rank, world)
                saved_step = step
            summary = record
    bar.close()
    if state["step"] and state["skipped"] == state["step"]:
        raise RuntimeError(
            f"all {state['step']} steps of the run in {out_dir} were skipped as non-finite (a NaN or inf "
            "loss or gradient): nothing was learned and no final checkpoint is written; check the "
            "inputs (audio, manifests) and --lr / --aux-lambda"
            + (
                f"; under --fp16 the loss scale fell to {scaler.get_scale():g}: when the forward itself overflows "
                "fp16 (an inf loss) no scale mends it: --bf16 (sm_80 on) or --no-bf16 (fp32)"
                if cfg.fp16
                else ""
            )
        )
    final = {}
    if val_examples and (is_main or sharded):
        final = evaluate_loss(model, val_examples, source, cfg, device)
        if is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": state["step"], "final": True, **final}) + "\n")
    ckpt.save(state["step"], model, optimizer, scheduler, scaler, state, rank, world)
    summary = {**summary, **final, "steps": state["step"], "skipped_total": state["skipped"]}
    if world > 1:
        dist.destroy_process_group()
    return summary


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    """Steps of the checkpoints a run holds, oldest first."""
    root = Path(output_dir) / "checkpoints"
    return [int(p.name.removeprefix("step_")) for p in step_folders(root)]


def load_trained(output_dir: str | Path, device="cpu", step: int | None = None) -> AudioLLM:
    """The model of a finished (or checkpointed) run: rebuilt from its config, trained weights
    loaded from its latest checkpoint, or from the checkpoint of `step`. Step 0 is the run's
    initialization: the weights its seed draws, with the semantic codebook the run fitted before
    its first step (read from its latest checkpoint)."""
    out = Path(output_dir)
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{out} holds no run: {cfg_path} is missing")
    try:
        cfg = TrainConfig(**json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: not a valid TrainConfig: {exc}") from exc
    model = build_model(cfg.model, seed=cfg.seed)
    if model.semantic is not None:
        model.semantic.fitted.fill_(True)
    if step is None or step == 0:
        path = Checkpointer(out, 1).latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {out / 'checkpoints'}")
    else:
        path = out / "checkpoints" / f"step_{step:07d}"
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint of step {step} in {out}; it holds {checkpoint_steps(out)}")
    if step == 0:
        if model.semantic is not None and parallel.is_sharded(path):
            model.semantic.codebook.copy_(
                parallel.load_sharded_model(path, model, {"semantic.codebook"})["semantic.codebook"]
            )
        elif model.semantic is not None:
            model.semantic.codebook.copy_(load_file(str(path / "model.safetensors"))["semantic.codebook"])
    else:
        load_trainable(model, path, trainable_names(model, cfg))
    return model.to(device).eval()


def run_features(output_dir: str | Path, model: AudioLLM) -> FeatureSource:
    """Features as a run's model reads them (its frozen encoder), through the run's feature cache
    where that folder exists (never a cache made anew relative to another working directory)."""
    cfg = json.loads((Path(output_dir) / "config.json").read_text())
    cache = Path(cfg.get("feature_cache") or "-")
    return FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder, cache_dir=cache if cache.is_dir() else None)


def main(argv: list[str] | None = None) -> int:
    cfg = train_config_from_argv(argv, description=__doc__)
    if not cfg.train_manifest:
        raise SystemExit("--train-manifest is required")
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if not k.startswith("expert_load")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
