"""Checkpoints of the reference LALM's training runs: writing them atomically, resuming from them,
and loading a trained run's model for evaluation and the studies.

A checkpoint holds what trains (safetensors; with --fsdp, torch.distributed.checkpoint shards that
any number of processes reads), the optimizer, the schedule, the data position and every RNG
state; it is assembled in a temporary folder and renamed into place, so a run killed at any
instant (SIGKILL included) resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adapter.cli import add_note
from adapter.files import atomic_write_text, fsync_write
from adapter.lalm.assemble import build_model
from adapter.lalm.config import TrainConfig
from adapter.lalm.data import FeatureSource
from adapter.lalm.model import AudioLLM
from adapter.lalm.training import parallel
from adapter.lalm.training.runs import RunFolder, checkpoint_steps, step_folders, step_name
from adapter.lalm.training.setup import barrier, trainable_names


def trainable_state(model: AudioLLM) -> dict[str, torch.Tensor]:
    """Trainable parameters plus the fitted semantic codebook: everything a rebuild cannot redraw."""
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if model.semantic is not None:
        state["semantic.codebook"] = model.semantic.codebook.detach().cpu()
        state["semantic.fitted"] = model.semantic.fitted.detach().cpu()
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """checkpoints/step_NNNNNNN/ and checkpoints/latest naming the newest; both replaced atomically.

    A step folder holds {model.safetensors, optimizer.pt, rng.pt} (one process or DDP: rank 0
    writes) or, `sharded` (FSDP), dcp/ with every rank's shards and rng_<rank>.pt (every rank
    writes, training/parallel.py); then scheduler.pt and state.json. It is assembled in a
    temporary folder that only a complete save renames into place, so a crash (SIGKILL included)
    at any instant leaves the last complete checkpoint the newest; a save that raises (a full disk)
    also removes its partial folder and adds a note naming the checkpoint that stands. With `full`
    > 0 (not sharded) only the newest `full` keep optimizer.pt; the older ones keep the rest."""

    def __init__(self, root: Path, keep: int, sharded: bool = False, full: int = 0) -> None:
        self.root = RunFolder(root).checkpoints
        self.keep = keep
        self.sharded = sharded
        self.full = full

    def save(
        self, step: int, model: AudioLLM, optimizer, scheduler, scaler, state: dict, rank: int = 0, world: int = 1
    ) -> Path:
        """Every rank calls it (a collective when sharded). An enabled loss scaler (--fp16) is saved
        in state.json under "scaler"."""
        final = self.root / step_name(step)
        tmp = self.root / f".tmp_step_{step:07d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(world)
        try:
            if self.sharded:
                parallel.save_sharded(tmp, model, optimizer, checkpoint_names(model, trained_now(model)))
                torch.save(rng_state(), tmp / f"rng_{rank}.pt")
            elif rank == 0:
                save_file(trainable_state(model), str(tmp / "model.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(rng_state(), tmp / "rng.pt")
            barrier(world)
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
            atomic_write_text(RunFolder(self.root.parent).latest, final.name)
            for old in step_folders(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            if self.full and not self.sharded:  # the newest `full` stay whole: a resume reads the newest
                for old in step_folders(self.root)[: -self.full]:
                    (old / "optimizer.pt").unlink(missing_ok=True)
        barrier(world)
        return final

    def latest(self) -> Path | None:
        pointer = RunFolder(self.root.parent).latest
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


def trained_now(model: AudioLLM) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_names(model: AudioLLM, trained: set[str]) -> set[str]:
    semantic = {"semantic.codebook", "semantic.fitted"} if model.semantic is not None else set()
    return trained | semantic


def load_trainable(model: AudioLLM, path: Path, trained: set[str]) -> None:
    """Load a checkpoint's model.safetensors into a model built from the same ModelConfig. Strict:
    the file must hold exactly the `trained` parameters (and the semantic codebook), each of the
    model's shape; anything else names the run that does not match and the tensors that differ."""
    expected = checkpoint_names(model, trained)
    if parallel.is_sharded(path):
        file = path / parallel.DCP_DIR
        held = parallel.sharded_model_names(path)
        tensors = parallel.load_sharded_model(path, model, expected & held) if held == expected else {}
    else:
        file = path / "model.safetensors"
        try:
            tensors = load_file(str(file))
        except Exception as exc:
            raise damaged(file, exc) from exc
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
        names = checkpoint_names(model, trained_now(model))
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
            earlier = resumable_before(path)
            way = f"move it out of {path.parent}, and --resume continues from {earlier}" if earlier else "--overwrite"
            raise ValueError(
                f"checkpoint {path} keeps the weights only (--full-checkpoints kept the optimizer state in the "
                f"newest checkpoints alone), so a run cannot resume from it: {way}"
            )
        load_trainable(model, path, trained_now(model))
        optimizer.load_state_dict(read_checkpoint_file(path / "optimizer.pt"))
        rng = path / "rng.pt"
    scheduler.load_state_dict(read_checkpoint_file(path / "scheduler.pt"))
    set_rng_state(read_checkpoint_file(rng))
    return read_checkpoint_file(path / "state.json")


def read_checkpoint_file(file: Path):
    """A checkpoint's .pt or .json file; a damaged one (copied in part, a failing disk: saves are
    atomic) is named, with the way back to the checkpoint before it."""
    try:
        if file.suffix == ".json":
            return json.loads(file.read_text())
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise damaged(file, exc) from exc


def resumable_before(step: Path) -> str | None:
    """The newest checkpoint older than `step` that a run can resume from (not a weights-only one)."""
    whole = [p.name for p in step_folders(step.parent) if p.name < step.name]
    whole = [n for n in whole if parallel.is_sharded(step.parent / n) or (step.parent / n / "optimizer.pt").is_file()]
    return whole[-1] if whole else None


def damaged(file: Path, exc: Exception) -> ValueError:
    step = file.parent
    earlier = resumable_before(step)
    way_back = (
        f"delete {step} or move it out of {step.parent}, and --resume continues from {earlier}"
        if earlier
        else "no earlier checkpoint a run can resume from exists: start afresh (--overwrite)"
    )
    return ValueError(f"cannot read the checkpoint file {file} ({type(exc).__name__}: {exc}); {way_back}")


def _provenance(run: RunFolder, path: Path, step: int, max_steps: int) -> dict:
    """What a loaded model is: its run, the checkpoint's step, a digest of the run's config.json,
    whether that is the newest checkpoint the run saved, and why not."""
    named = run.latest.read_text().strip() if run.latest.is_file() else None
    held = step_folders(run.checkpoints)
    newest, why = True, ""
    if named is not None and not (run.checkpoints / named).is_dir():
        newest, why = False, f"the run's newest checkpoint, {named}, is missing"
    elif held and path != held[-1]:
        newest, why = False, f"the run holds a newer checkpoint, {held[-1].name}"
    return {
        "run": str(run.path),
        "step": step,
        "config_sha256": hashlib.sha256(run.config.read_bytes()).hexdigest()[:16],
        "newest": newest,
        "why_not_newest": why,
        "max_steps": max_steps,
    }


def load_trained(output_dir: str | Path, device="cpu", step: int | None = None) -> AudioLLM:
    """The model of a finished (or checkpointed) run: rebuilt from its config, trained weights
    loaded from its latest checkpoint, or from the checkpoint of `step`. Step 0 is the run's
    initialization: the weights its seed draws, with the semantic codebook the run fitted before
    its first step (read from its latest checkpoint). The model's `trained_from` says what was
    loaded (_provenance); asked for the latest, a checkpoint that is not the newest the run saved
    (that one is missing) is warned of."""
    run = RunFolder(output_dir)
    out = run.path
    try:
        cfg = TrainConfig(**run.read_config())
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{run.config}: not a valid TrainConfig: {exc}") from exc
    model = build_model(cfg.model, seed=cfg.seed)
    if model.semantic is not None:
        model.semantic.fitted.fill_(True)
    if step is None or step == 0:
        path = Checkpointer(out, 1).latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {run.checkpoints}")
    else:
        path = run.step(step)
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
    model.trained_from = _provenance(run, path, step if step is not None else int(path.name[5:]), cfg.max_steps)
    if step is None and not model.trained_from["newest"]:
        warnings.warn(f"{out}: loading {path.name}, as {model.trained_from['why_not_newest']}", stacklevel=2)
    return model.to(device).eval()


def run_features(output_dir: str | Path, model: AudioLLM) -> FeatureSource:
    """Features as a run's model reads them (its frozen encoder), through the run's feature cache
    where that folder exists (never a cache made anew relative to another working directory)."""
    cfg = RunFolder(output_dir).read_config()
    cache = Path(cfg.get("feature_cache") or "-")
    return FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder, cache_dir=cache if cache.is_dir() else None)
