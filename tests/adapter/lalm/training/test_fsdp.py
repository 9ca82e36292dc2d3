"""--fsdp on 2 CPU processes (gloo): the losses of one process, sharded checkpoints that resume
after SIGKILL and on another number of processes (2 -> 1, 1 -> 2), the non-finite-step skip on
sharded gradients, and the balance loss over the global batch in the training loop."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter.lalm.config import TrainConfig
from adapter.lalm.training import checkpoint, loop, setup
from tests.adapter.lalm.training.test_loop import SMALL, _cfg, _env, _log, _wait_for_steps
from tests.utils import assert_close, torchrun

STEPS = ["--max-steps", "6", "--save-every", "2", "--eval-every", "0", "--semantic-codes", "8"]
TRAINABLE_ENCODER = ["--no-freeze-encoder"]


def _cmd(out, corpus, nproc, *extra, module="adapter.lalm.train", fsdp=True):
    launch = [sys.executable]
    if nproc > 1:
        launch = torchrun(nproc)
    args = ["--train-manifest", corpus[0], "--output-dir", str(out), *SMALL, *STEPS, *extra]
    return [*launch, "-m", module, *args, "--fsdp" if fsdp else "--no-fsdp"]


def _run(out, corpus, nproc, *extra, **kw):
    proc = subprocess.run(
        _cmd(out, corpus, nproc, *extra, **kw), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _rows(out) -> list[dict]:
    return [r for r in _log(out) if "ntp" in r]


def _stopped_at(src: Path, dst: Path, step: int) -> Path:
    """A copy of the run in `src` as it stood when its checkpoint of `step` was the newest."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:07d}")
    return dst


def _assert_same_run(a, b, rel=1e-5):
    """Two runs over the same micro-batches grouped on different process counts: float32 sums in
    another order, so equal to rounding (the DDP test's tolerance)."""
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 7))
    for x, y in zip(ra, rb, strict=True):
        assert x["answer_tokens"] == y["answer_tokens"] and x["audio_batches"] == y["audio_batches"]
        assert x["loss"] == pytest.approx(y["loss"], rel=rel) and x["lr"] == y["lr"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def _assert_identical_rerun(a, b):
    """The same processes redo the same computation from the checkpoint: identical numbers."""
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"]) for r in ra] == [(r["loss"], r["grad_norm"]) for r in rb]


@pytest.fixture(scope="module")
def fsdp_runs(module_tmp_path, mixed_corpus):
    """2 processes x 1 micro-batch and 1 process x 2 micro-batches, 6 steps, checkpoints at 2, 4, 6."""
    root = module_tmp_path
    corpus = (mixed_corpus[0], None)
    # A trainable encoder (in the root unit; text-only micro-batches never run it) with the semantic
    # codebook fitted through it: the path that shards the most.
    _run(root / "two", corpus, 2, "--grad-accum", "1", *TRAINABLE_ENCODER)
    _run(root / "one", corpus, 1, "--grad-accum", "2", *TRAINABLE_ENCODER)
    return root, corpus


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process(fsdp_runs):
    root, _ = fsdp_runs
    _assert_same_run(root / "two", root / "one")
    assert 1 in {r["audio_batches"] for r in _rows(root / "two")}  # a step with a text-only micro-batch
    assert 0 in {r["audio_batches"] for r in _rows(root / "two")}  # and one where both ranks are text-only
    ckpt = root / "two" / "checkpoints" / "step_0000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["dcp", "rng_0.pt", "rng_1.pt", "scheduler.pt", "state.json"]
    # One process reads the shards of two (load_trained, evaluation): the weights of the 1-process run.
    a, b = checkpoint.load_trained(root / "two"), checkpoint.load_trained(root / "one")
    trained = setup.trainable_names(a, TrainConfig(**json.loads((root / "two" / "config.json").read_text())))
    assert any(n.startswith("encoder.") for n in trained)
    for (name, wa), (_, wb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if name in trained:
            assert_close(wa, wb, rtol=1e-4, atol=1e-6, name=name)
    # Step 0, the initialization, takes the fitted semantic codebook from the shards too.
    init = checkpoint.load_trained(root / "two", step=0)
    assert torch.equal(init.semantic.codebook, a.semantic.codebook)
    assert not torch.equal(init.adapter.w1, a.adapter.w1)


@pytest.mark.slow
def test_fsdp_resumes_on_another_number_of_processes(fsdp_runs, tmp_path):
    root, corpus = fsdp_runs
    two_to_one = _stopped_at(root / "two", tmp_path / "two-to-one", 4)
    _run(two_to_one, corpus, 1, "--grad-accum", "2", "--resume", *TRAINABLE_ENCODER)
    _assert_same_run(two_to_one, root / "two")
    one_to_two = _stopped_at(root / "one", tmp_path / "one-to-two", 4)
    # ... switching activation checkpointing on: FSDP2's units replay their decoder layers in backward.
    _run(one_to_two, corpus, 2, "--grad-accum", "1", "--resume", "--activation-checkpointing", *TRAINABLE_ENCODER)
    _assert_same_run(one_to_two, root / "one")
    assert json.loads((one_to_two / "config.json").read_text())["activation_checkpointing"]
    # A resume that would change what a step consumes is refused before anything is written.
    refused = _stopped_at(root / "two", tmp_path / "refused", 4)
    cfg = TrainConfig(**{**json.loads((refused / "config.json").read_text()), "grad_accum": 1, "resume": True})
    with pytest.raises(ValueError, match="consumed 2 micro-batches; --grad-accum 1 on 1 process.*--grad-accum 2"):
        loop.train(cfg)


@pytest.mark.slow
def test_fsdp_sigkill_and_resume_gives_the_uninterrupted_losses(fsdp_runs, tmp_path):
    root, corpus = fsdp_runs
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(killed, corpus, 2, "--grad-accum", "1", *TRAINABLE_ENCODER),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # SIGKILL the launcher and both workers at once, as a lost node would
    )
    _wait_for_steps(proc, killed, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in _rows(killed)) < 6
    _run(killed, corpus, 2, "--grad-accum", "1", "--resume", *TRAINABLE_ENCODER)
    _assert_identical_rerun(root / "two", killed)


@pytest.mark.slow
def test_fsdp_sigterm_to_the_launcher_saves_and_resumes_with_the_same_losses(fsdp_runs, tmp_path):
    """A scheduler's stop: SIGTERM to torchrun, which passes it to both workers; they finish the
    step, save it together (sharded) and exit; the resume logs what the uninterrupted run did."""
    root, corpus = fsdp_runs
    stopped = tmp_path / "stopped"
    cmd = _cmd(stopped, corpus, 2, "--grad-accum", "1", *TRAINABLE_ENCODER)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, stopped, 2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0, err[-4000:]  # the launcher reports its stop as a failure
    step = max(r["step"] for r in _rows(stopped))
    assert 2 <= step < 6, step
    assert f"training stopped by SIGTERM after step {step}" in err, err[-4000:]
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"
    _run(stopped, corpus, 2, "--grad-accum", "1", "--resume", *TRAINABLE_ENCODER)
    _assert_identical_rerun(root / "two", stopped)


@pytest.mark.slow
def test_fsdp_skips_a_step_that_is_not_finite_on_one_rank(mixed_corpus, tmp_path):
    env = {**_env(), "POISON_RANK": "1", "POISON_CALL": "3"}
    cmd = _cmd(
        tmp_path, (mixed_corpus[0], None), 2, "--grad-accum", "1", module="tests.adapter.lalm.training.poisoned_train"
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["skipped"] for r in _rows(tmp_path)] == [False, False, True, False, False, False]
    model = checkpoint.load_trained(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_fsdp_fp16_an_overflow_in_one_ranks_shard_halves_the_scale_on_both(tone_corpus, tmp_path):
    """--fp16 under FSDP: an inf in one element of rank 1's gradient shard (where a scaled gradient
    that overflows fp16 in one place lands after the reduce-scatter) skips the step and halves the
    loss scale on both ranks: rank 0 logs the scale and losses of one process with the same overflow."""
    fp16 = ["--fp16", "--fp16-init-scale", "1024"]  # no overflow of its own (see test_train_reliability)
    module = "tests.adapter.lalm.training.poisoned_train"
    for nproc, rank, out in ((2, "1", "two"), (1, "0", "one")):
        env = {**_env(), "POISON_RANK": rank, "POISON_UNSCALE": "3"}
        cmd = _cmd(tmp_path / out, (tone_corpus[0], None), nproc, "--grad-accum", str(3 - nproc), *fp16, module=module)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["skipped"] for r in two] == [r["skipped"] for r in one] == [False, False, True, False, False, False]
    assert [r["loss_scale"] for r in two] == [r["loss_scale"] for r in one] == [1024.0] * 3 + [512.0] * 3
    # FSDP gathers every weight in fp16 (the norms' and embeddings' too, which autocast keeps fp32):
    # fp16 rounding apart: measured 2.0e-4 relative at most (2-core AMD EPYC, 2026-12-04); 2e-3 is
    # four fp16 ulps (2^-11 each).
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=2e-3)
    assert all(torch.isfinite(p).all() for p in checkpoint.load_trained(tmp_path / "two").parameters())


@pytest.mark.slow
def test_global_balance_scope_under_ddp_and_fsdp(fsdp_runs, mixed_corpus, tmp_path):
    """--balance-scope global trains under DDP and FSDP alike, text-only micro-batches included
    (the value and gradient over the global batch are checked on the adapter itself in
    tests/adapter/test_distributed.py), and its loss is not the local scope's."""
    root, corpus = fsdp_runs
    # With held-out evaluation every 3 steps: under FSDP every rank evaluates (each forward all-gathers).
    val = ["--val-manifest", mixed_corpus[1], "--eval-every", "3"]
    _run(tmp_path / "ddp", corpus, 2, "--grad-accum", "1", "--balance-scope", "global", *val, fsdp=False)
    _run(tmp_path / "fsdp", corpus, 2, "--grad-accum", "1", "--balance-scope", "global", *val)
    _assert_same_run(tmp_path / "ddp", tmp_path / "fsdp")
    evals = [[r["val_loss"] for r in _log(tmp_path / run) if "val_loss" in r] for run in ("ddp", "fsdp")]
    assert len(evals[0]) == 3 and evals[1] == pytest.approx(evals[0], rel=1e-5)  # steps 3, 6 and the final one
    g, lo = _rows(tmp_path / "fsdp"), _rows(root / "two")
    assert all(not r["skipped"] for r in g)
    first = next(i for i, r in enumerate(g) if r["audio_batches"] == 2)  # both ranks route tokens
    # Step 1 routes the same tokens with the same weights (lo's encoder trains, but not before its
    # first step): only the scope differs.
    assert g[0]["ntp"] == pytest.approx(lo[0]["ntp"], rel=1e-5)
    assert g[first]["aux"] != pytest.approx(lo[first]["aux"], rel=1e-3)


def test_a_crash_inside_a_sharded_save_leaves_the_last_checkpoint(tmp_path, tone_corpus, monkeypatch):
    """One process writes the sharded format too (fsdp without a process group); a save that dies
    after some shards are written is never the checkpoint a resume reads."""
    from adapter.lalm.training import parallel

    real_save = parallel.dcp.save

    def dying_save(state, *, checkpoint_id, **kw):
        if "step_0000004" in str(checkpoint_id):
            Path(checkpoint_id).mkdir(parents=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError("disk full (simulated)")
        return real_save(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(parallel.dcp, "save", dying_save)
    cfg = _cfg(tmp_path, tone_corpus, max_steps=6, eval_every=0, save_every=2, fsdp=True)
    with pytest.raises(OSError, match="disk full"):
        loop.train(cfg)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*step_*")) == ["step_0000002"]  # the half shard's folder went
    assert (ckpts / "latest").read_text() == "step_0000002"
    monkeypatch.setattr(parallel.dcp, "save", real_save)
    summary = loop.train(dataclasses.replace(cfg, resume=True))
    assert summary["steps"] == 6 and not list(ckpts.glob(".tmp_*"))
    uninterrupted = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    assert summary["loss"] == uninterrupted["loss"]  # the same computation from the step-2 checkpoint
