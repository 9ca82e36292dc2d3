"""The run folder: every file of one training run is named here, and read through here.

    <run>/config.json                 the run's TrainConfig, written before its first step
    <run>/log.jsonl                   one JSON record per logged step; evaluations; a final line
    <run>/checkpoints/step_NNNNNNN/   one checkpoint (checkpoint.py says what it holds)
    <run>/checkpoints/latest          the newest checkpoint's folder name
    <run>/.lock                       held while a process trains in the folder (RunFolderLock)
    <run>/eval.json                   the test-split evaluation (the experiment runners)
    <run>/train_seconds.json          training wall time, summed over resumed calls (the experiment runners)

Nothing here builds a model: the studies read logs and configs through this module alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path

from adapter.files import atomic_write_text
from adapter.lalm.config import ModelConfig, TrainConfig


class RunFolder:
    """The paths of the run in `path` (nothing is read or created by naming them)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.log = self.path / "log.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.latest = self.checkpoints / "latest"
        self.lock = self.path / ".lock"
        self.eval = self.path / "eval.json"
        self.train_seconds = self.path / "train_seconds.json"

    def step(self, step: int) -> Path:
        """The folder of the checkpoint of `step` (whether or not it exists)."""
        return self.checkpoints / step_name(step)

    def read_config(self) -> dict:
        """The run's config.json as saved (FileNotFoundError naming the folder when it holds no run)."""
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.path} holds no run: {self.config} is missing")
        return json.loads(self.config.read_text())

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


STEP_NAME = re.compile(r"step_\d{7}")  # a checkpoint folder (not step_0000004.bad, set aside by hand)


def step_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (a run's checkpoints/), oldest first."""
    return sorted(p for p in root.glob("step_*") if STEP_NAME.fullmatch(p.name) and p.is_dir())


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    """Steps of the checkpoints a run holds, oldest first."""
    return [int(p.name.removeprefix("step_")) for p in step_folders(RunFolder(output_dir).checkpoints)]


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


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of a run's log.jsonl (log_lines without the raw lines)."""
    return [record for _, record in log_lines(RunFolder(run_dir).log)]


def truncate_log(path: Path, last_step: int) -> None:
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


class RunFolderLock:
    """<run folder>/.lock, held (flock) while a run trains there: a second run in the folder (another
    terminal, a requeued job whose predecessor still runs) is refused by name instead of mixing its
    checkpoints and log lines with the first. The OS drops the lock when its process ends, however
    it ends (SIGKILL included), so no stale lock outlives a crash; the file stays, emptied."""

    def __init__(self, out_dir: Path) -> None:
        self.path = RunFolder(out_dir).lock
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
