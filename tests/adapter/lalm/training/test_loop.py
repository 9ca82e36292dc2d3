"""The training loop: learning, exact resume after SIGKILL, skipped non-finite steps, atomic
checkpoints, DDP on 2 CPU processes equal to one process, and the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter.lalm.config import ModelConfig, TrainConfig, train_config_from_argv
from adapter.lalm.data import read_manifest
from adapter.lalm.model import AudioLLM
from adapter.lalm.training import checkpoint, loop, setup
from adapter.lalm.training import runs as run_folder
from adapter.lalm.training.parallel import decoder_layers
from tests.utils import torchrun

ROOT = Path(__file__).resolve().parents[4]
SMALL = [
    "--encoder",
    "demo",
    "--audio-dim",
    "32",
    "--tiny-llm-hidden",
    "64",
    "--max-batch-size",
    "8",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--adapter-backend",
    "torch",
    "--no-progress",
]


def _cfg(out, corpus, **kw):
    model = ModelConfig(encoder="demo", audio_dim=32, tiny_llm_hidden=64, adapter_backend="torch")
    base = dict(
        train_manifest=str(corpus[0]),
        val_manifest=str(corpus[1]),
        output_dir=str(out),
        model=model,
        max_batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if line.strip()]


def _env(threads=1):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def test_wsd_schedule():
    cfg = TrainConfig(train_manifest="x", max_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    f = setup.wsd_schedule(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == f(79) == 1.0
    assert f(80) < 1.0 and f(99) == pytest.approx(0.1)
    assert [f(s) for s in range(80, 100)] == sorted((f(s) for s in range(80, 100)), reverse=True)


def test_loss_falls_on_held_out_data(tmp_path, tone_corpus):
    summary = loop.train(_cfg(tmp_path, tone_corpus, max_steps=40, eval_every=10, save_every=0))
    evals = [r["val_loss"] for r in _log(tmp_path) if "val_loss" in r]
    assert len(evals) >= 4
    assert evals[-1] < 0.5 * evals[0] and evals[-1] < 3.0, evals
    assert summary["steps"] == 40 and summary["skipped_total"] == 0
    steps = [r for r in _log(tmp_path) if "ntp" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(len(r["expert_load_0"]) == 8 and abs(sum(r["expert_load_0"]) - 1) < 1e-3 for r in steps)
    # The trained model reloads from its run folder and gives the same held-out loss.
    model = checkpoint.load_trained(tmp_path)
    src = loop.FeatureSource(80, encoder=model.encoder)
    again = loop.evaluate_loss(
        model, read_manifest(tone_corpus[1]), src, _cfg(tmp_path, tone_corpus), torch.device("cpu")
    )
    assert again["val_loss"] == pytest.approx(evals[-1], rel=1e-5)


def _cli(out, corpus, *extra):
    return [
        sys.executable,
        "-m",
        "adapter.lalm.train",
        "--train-manifest",
        str(corpus[0]),
        "--output-dir",
        str(out),
        *SMALL,
        *extra,
    ]


RESUME_ARGS = ["--max-steps", "12", "--save-every", "3", "--eval-every", "0", "--semantic-codes", "8"]


@pytest.fixture(scope="module")
def uninterrupted(module_tmp_path, tone_corpus):
    """The run the interrupted ones must reproduce: 12 steps, checkpoints every 3."""
    full = module_tmp_path / "uninterrupted"
    full.mkdir()
    subprocess.run(_cli(full, tone_corpus, *RESUME_ARGS), check=True, env=_env(), capture_output=True, timeout=600)
    return full


def _wait_for_steps(proc: subprocess.Popen, out: Path, steps: int) -> None:
    """Until the run in `out` has logged `steps` steps (or ended, or 300 s passed)."""
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and sum(1 for _ in log.open()) >= steps:
            return
        time.sleep(0.05)


def _start_and_signal(out, corpus, args, sig, after_steps: int, probe=None) -> tuple[int, str]:
    """Start a training run, send `sig` once `after_steps` steps are logged (after `probe(pid)`, if
    given, looked at the running run); its status and stderr."""
    proc = subprocess.Popen(
        _cli(out, corpus, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for_steps(proc, out, after_steps)
    if probe is not None:
        probe(proc.pid)
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1]
    return proc.returncode, err


def _assert_same_run(a: Path, b: Path) -> None:
    ra = [r for r in _log(a) if "ntp" in r]
    rb = [r for r in _log(b) if "ntp" in r]
    assert [r["step"] for r in rb] == list(range(1, 13))  # the redone steps replaced, not duplicated
    # A resume reruns the same computation from the saved state: the same numbers to the bit.
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in ra] == [(r["loss"], r["grad_norm"], r["lr"]) for r in rb]
    wa = load_file(str(a / "checkpoints" / "step_0000012" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "step_0000012" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path, tone_corpus, uninterrupted):
    killed = tmp_path / "killed"
    # Kill between checkpoints: after step 7 is logged, before 9 is saved.
    status, _ = _start_and_signal(killed, tone_corpus, RESUME_ARGS, signal.SIGKILL, after_steps=7)
    assert status == -signal.SIGKILL
    steps_before = [r["step"] for r in _log(killed)]
    assert 7 <= max(steps_before) < 12, steps_before
    subprocess.run(
        _cli(killed, tone_corpus, *RESUME_ARGS, "--resume"), check=True, env=_env(), capture_output=True, timeout=600
    )
    _assert_same_run(uninterrupted, killed)


def test_sigterm_saves_the_step_it_stops_at_and_resume_continues(tmp_path, tone_corpus, uninterrupted):
    """No periodic checkpoints: the one the stop writes is all a resume has."""
    stopped = tmp_path / "stopped"
    args = [*RESUME_ARGS, "--save-every", "0"]  # the last flag given wins
    held_by = []  # while it trains, the run holds its folder's lock (a second run there is refused)
    probe = lambda pid: held_by.append((pid, run_folder.RunFolderLock(stopped).acquire()))  # noqa: E731
    status, err = _start_and_signal(stopped, tone_corpus, args, signal.SIGTERM, after_steps=5, probe=probe)
    assert held_by[0][1].startswith(f"pid {held_by[0][0]} on "), held_by
    assert status == 128 + signal.SIGTERM, err[-3000:]
    step = max(r["step"] for r in _log(stopped))
    assert 5 <= step < 12, step
    saved = stopped / "checkpoints" / f"step_{step:07d}"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["latest", saved.name]
    assert json.loads((saved / "state.json").read_text())["step"] == step
    assert f"training stopped by SIGTERM after step {step}; saved {saved}" in err and "Traceback" not in err
    subprocess.run(
        _cli(stopped, tone_corpus, *args, "--resume"), check=True, env=_env(), capture_output=True, timeout=600
    )
    _assert_same_run(uninterrupted, stopped)


def test_non_finite_loss_is_skipped_not_applied(tmp_path, tone_corpus, monkeypatch):
    original = AudioLLM.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro-batch: step 3
            out.ntp_sum = out.ntp_sum * float("nan")
        return out

    monkeypatch.setattr(AudioLLM, "forward", poisoned)
    summary = loop.train(_cfg(tmp_path, tone_corpus, max_steps=5, eval_every=0, save_every=0))
    rows = [r for r in _log(tmp_path) if "ntp" in r]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert summary["skipped_total"] == 1
    weights = load_file(str(tmp_path / "checkpoints" / "step_0000005" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_checkpoint_writes_are_atomic(tmp_path, tone_corpus, monkeypatch):
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("rng.pt") and "step_0000004" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full") as failure:
        loop.train(_cfg(tmp_path, tone_corpus, max_steps=6, eval_every=0, save_every=2))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*step_*")) == ["step_0000002"]  # the partial save's folder went
    assert "step_0000004 was not saved" in str(failure.value.__notes__)
    assert f"{ckpts / 'step_0000002'}, stands: --resume" in str(failure.value.__notes__)
    assert (ckpts / "latest").read_text() == "step_0000002"
    monkeypatch.setattr(torch, "save", real_save)
    summary = loop.train(_cfg(tmp_path, tone_corpus, max_steps=6, eval_every=0, save_every=2, resume=True))
    assert summary["steps"] == 6
    # A fresh run never silently reuses (or clobbers) a folder that holds a run.
    with pytest.raises(ValueError, match="already holds a run .*--resume .*--overwrite"):
        loop.train(_cfg(tmp_path, tone_corpus, max_steps=2, eval_every=0, save_every=0))
    loop.train(_cfg(tmp_path, tone_corpus, max_steps=2, eval_every=0, save_every=0, overwrite=True))
    assert [r["step"] for r in _log(tmp_path) if "ntp" in r] == [1, 2]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002"]


def test_two_process_ddp_equals_one_process(tmp_path, mixed_corpus):
    """Mixed text/audio data: on some steps one rank's micro-batch is text-only, which must not
    stop DDP ("Expected to have finished reduction in the prior iteration"). The two processes
    read their features from a --feature-cache folder they filled half each, the one process from
    memory."""
    args = ["--max-steps", "4", "--save-every", "0", "--eval-every", "0"]
    corpus = (mixed_corpus[0], None)
    single = tmp_path / "single"
    subprocess.run(
        _cli(single, corpus, *args, "--grad-accum", "2"), check=True, env=_env(), capture_output=True, timeout=600
    )
    ddp = tmp_path / "ddp"
    cmd = [
        *torchrun(2),
        "-m",
        "adapter.lalm.train",
        "--train-manifest",
        mixed_corpus[0],
        "--output-dir",
        str(ddp),
        *SMALL,
        *args,
        "--grad-accum",
        "1",
        "--feature-cache",
        str(tmp_path / "features"),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = Path(mixed_corpus[0].split(",")[0]).read_text().splitlines()
    clips = {r["audio"] for r in map(json.loads, manifest) if r.get("audio")}
    assert len(list((tmp_path / "features").glob("*/*.safetensors"))) == len(clips)
    assert not list((tmp_path / "features").rglob("*.tmp"))
    a = [r for r in _log(single) if "ntp" in r]
    b = [r for r in _log(ddp) if "ntp" in r]
    assert len(a) == len(b) == 4
    assert 1 in {r["audio_batches"] for r in a}, a  # a step where one of the two micro-batches is text-only
    for ra, rb in zip(a, b, strict=True):
        assert ra["answer_tokens"] == rb["answer_tokens"] and ra["audio_batches"] == rb["audio_batches"]
        # The two processes sum the same micro-batches in another grouping: float32 rounding only.
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        if ra["expert_load_0"] is None:
            assert rb["expert_load_0"] is None
        else:
            assert ra["expert_load_0"] == pytest.approx(rb["expert_load_0"], abs=1e-4)
    wa = load_file(str(single / "checkpoints" / "step_0000004" / "model.safetensors"))
    wb = load_file(str(ddp / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (a child of the launcher with RANK=rank), if started."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if ppid == launcher_pid else []
        except (OSError, ValueError, IndexError):  # not a process, or one that just ended
            continue
        if f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_signal_to_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, tone_corpus):
    """SIGTERM to rank 1 alone: rank 0 learns of it at the next step boundary (the step's counts
    all-reduce carries the request), both save that step together and exit; nobody hangs."""
    out = tmp_path / "ddp"
    args = ["--max-steps", "200", "--save-every", "0", "--eval-every", "0"]
    cmd = [*torchrun(2), "-m", "adapter.lalm.train", "--train-manifest", str(tone_corpus[0])]
    cmd += ["--output-dir", str(out), *SMALL, *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, out, 2)
    worker = _worker_pid(proc.pid, rank=1)
    assert worker is not None, "no rank-1 worker found"
    os.kill(worker, signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0, err[-3000:]  # torchrun reports the workers' 143 as a failure
    step = max(r["step"] for r in _log(out))
    assert 2 <= step < 200, step
    saved = out / "checkpoints" / f"step_{step:07d}"
    assert json.loads((saved / "state.json").read_text())["step"] == step
    assert (out / "checkpoints" / "latest").read_text().strip() == saved.name
    assert f"training stopped by a signal to another process after step {step}; saved {saved}" in err, err[-3000:]


def test_cli_has_help_for_every_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "adapter.lalm.train", "--help"], capture_output=True, text=True, env=_env(), check=True
    )
    for flag in (
        "--train-manifest",
        "--aux-lambda",
        "--freeze-llm",
        "--resume",
        "--semantic-codes",
        "--adapter",
        "--grad-accum",
        "--warmup-steps",
        "--decay-fraction",
    ):
        assert flag in proc.stdout
    cfg = train_config_from_argv(["--train-manifest", "m.jsonl", "--adapter", "dense", "--no-freeze-encoder"])
    assert cfg.model.adapter == "dense" and cfg.freeze_encoder is False
    with pytest.raises(ValueError, match="adapter must be one of"):
        train_config_from_argv(["--train-manifest", "m.jsonl", "--adapter", "moe-3c9"])


def test_what_trains_is_configurable(tmp_path, tone_corpus):
    """Encoder trained through the forward pass (mels in the batch), LLM frozen: only the encoder,
    fusion and adapter are saved, and the frozen LLM is bit-identical to its rebuild."""
    cfg = _cfg(tmp_path, tone_corpus, max_steps=3, eval_every=0, save_every=0, freeze_encoder=False, freeze_llm=True)
    loop.train(cfg)
    saved = load_file(str(tmp_path / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert any(k.startswith("encoder.") for k in saved) and any(k.startswith("adapter.") for k in saved)
    assert not any(k.startswith("llm.") for k in saved)
    fresh = loop.build_model(cfg.model, seed=cfg.seed)
    trained = checkpoint.load_trained(tmp_path)
    assert not torch.equal(fresh.encoder.encoder.conv1.weight, trained.encoder.encoder.conv1.weight)
    assert all(torch.equal(a, b) for a, b in zip(fresh.llm.parameters(), trained.llm.parameters(), strict=True))


@pytest.mark.parametrize("adapter", ["moe-8c4", "moe-8c4-parallel"])
def test_training_losses_agree_on_both_backends(tmp_path, tone_corpus, adapter):
    """Issue 21's bug hunt: the LALM's use of the adapter is the same on the torch reference and
    on the Triton kernels (interpreter): a short run logs the same losses, gradient norms and
    expert loads within float32 rounding (the two backends sum in other orders)."""
    logs = {}
    for backend in ("torch", "triton"):
        cfg = _cfg(tmp_path / backend, tone_corpus, max_steps=3, eval_every=0, save_every=0)
        cfg.model.adapter, cfg.model.adapter_backend = adapter, backend
        loop.train(cfg)
        logs[backend] = [r for r in _log(tmp_path / backend) if "ntp" in r]
    for a, b in zip(logs["torch"], logs["triton"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["aux"] == pytest.approx(b["aux"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        # Routing: weights that differ by rounding could flip a near-tie on another CPU: a token's share.
        assert a["expert_load_0"] == pytest.approx(b["expert_load_0"], abs=0.01)


def test_activation_checkpointing_recomputes_the_layers_and_keeps_the_losses(tmp_path, tone_corpus, monkeypatch):
    """--activation-checkpointing: every decoder layer runs once more with gradients on (its
    recomputation in backward) per micro-batch, and the losses, gradient norms and learning
    rates equal the run without it to the bit: the recomputation repeats the same computation on
    the same shapes (and the same RNG state). A resumed run may switch it."""
    real_build = loop.build_model
    grad_calls = {}

    def counting_build(config, seed=0):
        model = real_build(config, seed=seed)
        run = grad_calls.setdefault(len(grad_calls), [])
        # A pre-hook inside the layer: the checkpoint replays the layer's forward (not its hooks) and
        # stops the replay once the last saved tensor is back, before the MLP returns.
        for layer in decoder_layers(model.llm):
            layer.mlp.register_forward_pre_hook(lambda *_: run.append(torch.is_grad_enabled()))
        return model

    monkeypatch.setattr(loop, "build_model", counting_build)
    logs = []
    for name, on in (("plain", False), ("checkpointed", True)):
        loop.train(_cfg(tmp_path / name, tone_corpus, max_steps=3, save_every=0, activation_checkpointing=on))
        logs.append([(r["loss"], r["grad_norm"], r["lr"]) for r in _log(tmp_path / name) if "ntp" in r])
    assert logs[0] == logs[1] and len(logs[0]) == 3
    plain, checkpointed = (sum(calls) for calls in grad_calls.values())
    assert plain > 0 and checkpointed == 2 * plain
    assert "activation_checkpointing" in run_folder.RESUMABLE_CHANGES
