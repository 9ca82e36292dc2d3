"""The training loop on inputs the happy path does not feed: mixed text/audio data (text-only
micro-batches, resumed on one), the trainable encoder with a semantic codebook, resumes that
would mix runs, refused runs, config files with flags, non-finite settings, torn logs."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from adapter.lalm.config import ModelConfig, TrainConfig, train_config_from_argv
from adapter.lalm.model import AudioLLM
from adapter.lalm.training import checkpoint, loop, setup
from adapter.lalm.training import runs as run_folder
from tests.adapter.lalm.training.poisoned_train import overflow_gradient_shard
from tests.adapter.lalm.training.test_loop import ROOT, _cfg, _env, _log


def _steps(out) -> list[dict]:
    return [r for r in _log(out) if "ntp" in r]


def test_text_only_micro_batches_train_log_and_resume(tmp_path, mixed_corpus, monkeypatch):
    """Issue 18 items 2 and 6: no crash on a text-only micro-batch (first step or resumed step),
    no stale expert loads on it, and the balance loss averaged over the micro-batches that ran the
    adapter, logged unweighted even for the w/o-EBL preset (aux_loss_weight 0)."""
    kw = dict(max_steps=8, eval_every=0, grad_accum=2, seed=0)
    kw["model"] = _cfg(tmp_path, mixed_corpus).model
    kw["model"].adapter = "moe-8c4-no-ebl"
    full = tmp_path / "full"
    loop.train(_cfg(full, mixed_corpus, save_every=0, **kw))
    rows = _steps(full)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        if r["audio_batches"] == 0:  # nothing ran the adapter: no loads, no L_aux
            assert r["expert_load_0"] is None and r["aux"] is None and r["aux_weighted"] is None
        else:
            assert abs(sum(r["expert_load_0"]) - 1) < 1e-3
            # L_aux of a near-balanced router is about k = 4 whatever share of the step was text
            # (dividing by all micro-batches would halve it on a mixed step); its weight is 0 here.
            assert 3.5 < r["aux"] < 8.0 and r["aux_weighted"] == 0.0
    kinds = {r["audio_batches"] for r in rows}
    assert 0 in kinds and 2 in kinds and 1 in kinds, kinds  # text-only, all-audio and mixed steps ran
    # A crash after a checkpoint, resumed where the next step is text-only, redoes the same steps.
    text_step = next(r["step"] for r in rows if r["audio_batches"] == 0 and r["step"] > 1)
    crashed = tmp_path / "crashed"
    cfg = _cfg(crashed, mixed_corpus, save_every=text_step - 1, **kw)
    original, calls = AudioLLM.forward, {"n": 0}

    def crash_after_checkpoint(self, batch):
        calls["n"] += 1
        if calls["n"] > 2 * (text_step - 1):  # step text_step's first micro-batch: after the checkpoint
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(AudioLLM, "forward", crash_after_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg)
    monkeypatch.setattr(AudioLLM, "forward", original)
    loop.train(_cfg(crashed, mixed_corpus, save_every=text_step - 1, resume=True, **kw))
    again = _steps(crashed)
    assert [r["step"] for r in again] == list(range(1, 9))
    keys = ("loss", "aux", "grad_norm", "expert_load_0")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]


def test_trainable_encoder_with_semantic_codes(tmp_path, tone_corpus):
    """Issue 18 item 4: the codebook is fitted through the (trainable) encoder at its start."""
    cfg = _cfg(tmp_path, tone_corpus, max_steps=2, eval_every=0, save_every=0, freeze_encoder=False)
    cfg.model.semantic_codes = 8
    loop.train(cfg)
    model = checkpoint.load_trained(tmp_path)
    assert bool(model.semantic.fitted) and torch.isfinite(model.semantic.codebook).all()
    assert model.semantic.codebook.abs().sum() > 0


def test_resume_refuses_another_config_and_leaves_the_run_untouched(tmp_path, tone_corpus):
    """Issue 18 item 5 and issue 20 item 2: a resume with other settings, or a fresh run in a
    used folder, is refused before anything is written; loading is strict."""
    base = dict(max_steps=2, eval_every=0, save_every=0)
    loop.train(_cfg(tmp_path, tone_corpus, **base))
    saved = {p.name: p.read_bytes() for p in (tmp_path / "config.json", tmp_path / "log.jsonl")}
    with pytest.raises(ValueError, match=r"configuration differs .*lr: 0.003 -> 0.001"):
        loop.train(_cfg(tmp_path, tone_corpus, resume=True, lr=1e-3, **base))
    dense = _cfg(tmp_path, tone_corpus, **base)
    dense.model.adapter = "dense"
    with pytest.raises(ValueError, match="already holds a run"):
        loop.train(dense)
    with pytest.raises(ValueError, match=r"model.adapter: 'moe-8c4' -> 'dense'"):
        loop.train(dataclasses.replace(dense, resume=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "config.json", tmp_path / "log.jsonl")} == saved
    # Settings that steer only logging and checkpoints may change on resume.
    summary = loop.train(_cfg(tmp_path, tone_corpus, resume=True, **{**base, "log_every": 5}))
    assert summary["steps"] == 2
    # A config.json that no longer matches its checkpoint (edited by hand) is refused by name.
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["adapter"] = "dense"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match .*missing \d+ tensor.*adapter\.(up|down)"):
        checkpoint.load_trained(tmp_path)


def test_resume_without_a_checkpoint_starts_a_clean_log(tmp_path, tone_corpus):
    """Issue 18 item 5: a run killed before its first checkpoint left log lines; --resume starts
    afresh and must not keep them (they would duplicate steps)."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "ntp": 9.0}) + "\n" for s in (1, 2, 3)))
    loop.train(_cfg(tmp_path, tone_corpus, max_steps=2, eval_every=0, save_every=0, resume=True))
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2] and all(r["ntp"] != 9.0 for r in _steps(tmp_path))


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, tone_corpus, capsys):
    """Issue 20 item 12: a crash in mid-append leaves half a line; the checkpoints are intact."""
    base = dict(max_steps=2, eval_every=0, save_every=0)
    loop.train(_cfg(tmp_path, tone_corpus, **base))
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')
    loop.train(_cfg(tmp_path, tone_corpus, resume=True, **base))
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2] and "torn last line" in capsys.readouterr().err
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl:2: not valid JSON"):
        loop.train(_cfg(tmp_path, tone_corpus, resume=True, **base))


def test_a_run_whose_every_step_is_skipped_fails(tmp_path, tone_corpus, monkeypatch):
    """Issue 20 item 6: NaN everywhere must not end in success with the untrained start saved."""
    original = AudioLLM.forward

    def poisoned(self, batch):
        out = original(self, batch)
        out.ntp_sum = out.ntp_sum * float("nan")
        return out

    monkeypatch.setattr(AudioLLM, "forward", poisoned)
    with pytest.raises(RuntimeError, match="all 3 steps .* were skipped as non-finite"):
        loop.train(_cfg(tmp_path, tone_corpus, max_steps=3, eval_every=0, save_every=0))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flag", ["--aux-lambda", "--grad-clip", "--weight-decay", "--lr", "--fp16-init-scale"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_refused(flag, value):
    with pytest.raises(ValueError, match=flag[2:].replace("-", "_")):
        train_config_from_argv(["--train-manifest", "m.jsonl", flag, value])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--adapter", "dense", "--routing", "frozen"], r"routing='frozen' apply to MoE presets"),
        (["--adapter", "dense", "--expert-init", "replicated"], r"expert_init='replicated' apply to MoE presets"),
        (["--adapter", "dense", "--balance-scope", "global"], r"balance_scope='global' apply to MoE presets"),
        (["--resume", "--overwrite"], "resume and overwrite contradict each other"),
    ],
)
def test_flags_that_would_do_nothing_or_contradict_are_refused(argv, match):
    """Issue 39 item 9: these were accepted and silently ignored (--resume won over --overwrite)."""
    with pytest.raises(ValueError, match=match):
        train_config_from_argv(["--train-manifest", "m.jsonl", *argv])
    train_config_from_argv(
        ["--train-manifest", "m.jsonl", "--adapter", "moe-8c4", *argv[2:]]
        if "--adapter" in argv
        else ["--train-manifest", "m.jsonl"]
    )


def test_an_experiment_applies_moe_only_settings_to_its_moe_presets_alone(tmp_path):
    from adapter.lalm.studies.experiment import ExperimentConfig

    exp = ExperimentConfig.of(expert_init="replicated")
    m = {"train": tmp_path / "t.jsonl", "val": tmp_path / "v.jsonl"}
    assert exp.train_config("dense", m, tmp_path / "d").model.expert_init == "independent"
    assert exp.train_config("moe-8c4", m, tmp_path / "m").model.expert_init == "replicated"


def test_config_file_flags_override_it_through_the_real_cli(tmp_path, tone_corpus):
    """Issue 20 item 1: every flag given beside --config wins, in both `--flag v` and `--flag=v`
    forms, including through the console entry point's own sys.argv."""
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(_cfg(tmp_path / "from-file", tone_corpus, max_steps=50, lr=1e-3).to_json())
    cfg = train_config_from_argv(["--config", str(cfg_path), "--lr=0.5", "--max-steps", "7", "--no-progress"])
    assert (cfg.lr, cfg.max_steps, cfg.progress) == (0.5, 7, False)
    assert cfg.output_dir == str(tmp_path / "from-file") and cfg.model.audio_dim == 32  # the rest from the file
    cfg = train_config_from_argv(["--config", str(cfg_path), "--adapter=dense", "--audio-dim", "16"])
    assert (cfg.model.adapter, cfg.model.audio_dim, cfg.lr) == ("dense", 16, 1e-3)
    other = tmp_path / "other"
    cmd = [sys.executable, "-m", "adapter.lalm.train", "--config", str(cfg_path), "--max-steps", "1"]
    cmd += ["--output-dir", str(other), "--lr=0.5", "--eval-every", "0"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads((other / "config.json").read_text())
    assert (written["max_steps"], written["lr"]) == (1, 0.5) and not (tmp_path / "from-file").exists()
    assert [r["step"] for r in _steps(other)] == [1] and math.isclose(_steps(other)[0]["lr"], 0.5 / 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(cfg_path.read_text()), "freeze_llm": "false"}))
    with pytest.raises(ValueError, match="freeze_llm must be of type bool, got 'false'"):
        train_config_from_argv(["--config", str(bad)])


def test_an_empty_training_manifest_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl' hold no examples"):
        loop.train(TrainConfig(train_manifest=str(empty), output_dir=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run").exists()  # refused before the folder was made


def test_bf16_on_a_gpu_without_bf16_hardware_is_refused_before_anything(tmp_path, monkeypatch):
    """A T4 (sm_75) answers torch.cuda.is_bf16_supported() with True (a bf16 tensor can be made) but
    emulates bf16 matmuls and has no bf16 cuDNN convolutions: --bf16, the default, is refused with
    the flags that train there (--fp16, --no-bf16), before the run folder exists. --fp16 passes the
    check (it replaces bf16), and so does an A100 (sm_80)."""
    cuda = torch.device("cuda", 0)
    capability = [(7, 5)]
    monkeypatch.setattr(loop, "distributed", lambda: (0, 1, cuda))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability[0] >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cfg = TrainConfig(train_manifest=str(tmp_path / "none.jsonl"), output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"--bf16 \(the default\) on Tesla T4 \(sm_75\).*pass --fp16 .* or --no-bf16"):
        loop.train(cfg)
    assert not (tmp_path / "run").exists()
    fp16, fp32 = dataclasses.replace(cfg, fp16=True), dataclasses.replace(cfg, bf16=False)
    assert setup.bf16_refusal(fp16, cuda) is None and setup.bf16_refusal(fp32, cuda) is None
    assert setup.compute_dtype(fp16, cuda) == torch.float16 and setup.compute_dtype(fp32, cuda) is None
    assert setup.bf16_refusal(cfg, torch.device("cpu")) is None
    assert setup.compute_dtype(cfg, torch.device("cpu")) is None  # bf16 is ignored on CPU ...
    assert setup.compute_dtype(fp16, torch.device("cpu")) == torch.float16  # ... fp16 is not: it is asked for
    capability[0] = (8, 0)
    assert setup.bf16_refusal(cfg, cuda) is None and setup.compute_dtype(cfg, cuda) == torch.bfloat16


def test_fp16_scales_the_loss_skips_an_overflow_at_half_the_scale_and_resumes_at_it(tmp_path, tone_corpus, monkeypatch):
    """--fp16 (fp16 autocast, on CPU too): the loss scale starts at --fp16-init-scale and is logged;
    a step whose scaled gradients overflow (an inf put into one gradient as the scaler unscales it)
    is skipped, counted, and halves the scale; the weights stay fp32 and finite; a crash after the
    checkpoint of that step resumes at the halved scale with the uninterrupted run's numbers."""
    # A start of 2^10 keeps the scaled gradients of this model (norm <= 10) far from fp16's 65504,
    # so the one overflow is the injected one on every CPU; 2^16, the default, overflowed at step 2
    # on its own (2-core AMD EPYC, 2026-12-04).
    kw = dict(max_steps=5, eval_every=0, fp16=True, fp16_init_scale=1024.0)
    overflow_gradient_shard(3, monkeypatch.setattr)
    full = tmp_path / "full"
    loop.train(_cfg(full, tone_corpus, save_every=0, **kw))
    rows = _steps(full)
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert [r["loss_scale"] for r in rows] == [1024.0] * 3 + [512.0] * 2
    assert math.isfinite(rows[2]["loss"]) and rows[2]["grad_norm"] == math.inf and rows[-1]["skipped_total"] == 1
    model = checkpoint.load_trained(full)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    state = json.loads((full / "checkpoints/step_0000005/state.json").read_text())
    assert state["scaler"]["scale"] == 512.0
    # fp32 from the same start: step 1's loss is the same forward, its matmuls in fp16 (inputs
    # rounded to 2^-11 relative; measured 4.7e-7 apart on the 2-core AMD EPYC, 2026-12-04: the sums
    # average the rounding out).
    fp32 = tmp_path / "fp32"
    loop.train(_cfg(fp32, tone_corpus, save_every=0, max_steps=1, eval_every=0))
    assert rows[0]["loss"] == pytest.approx(_steps(fp32)[0]["loss"], rel=1e-3)
    assert "loss_scale" not in _steps(fp32)[0]
    # Crash in step 4, after the checkpoint of the skipped step 3; the resume starts at 512.
    crashed = tmp_path / "crashed"
    overflow_gradient_shard(3, monkeypatch.setattr)  # counts anew (the first one's count is past 3)
    original = AudioLLM.forward
    calls = {"n": 0}

    def crash_in_step_4(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(AudioLLM, "forward", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(_cfg(crashed, tone_corpus, save_every=3, **kw))
    monkeypatch.setattr(AudioLLM, "forward", original)
    loop.train(_cfg(crashed, tone_corpus, save_every=3, resume=True, **kw))
    keys = ("loss", "grad_norm", "loss_scale", "skipped", "skipped_total")
    assert [[r[k] for k in keys] for r in _steps(crashed)] == [[r[k] for k in keys] for r in rows]


def test_older_checkpoints_keep_the_weights_only_with_full_checkpoints(tmp_path, tone_corpus):
    """--full-checkpoints 1: the newest checkpoint keeps the optimizer state (a resume reads it),
    the older kept ones the weights, rng and schedule (the analyses read their weights); a resume
    that would land on a weights-only checkpoint is refused with the way out."""
    kw = dict(max_steps=4, eval_every=0, save_every=1, keep_checkpoints=3, full_checkpoints=1)
    loop.train(_cfg(tmp_path, tone_corpus, **kw))
    root = tmp_path / "checkpoints"
    held = {p.name: sorted(f.name for f in p.iterdir()) for p in run_folder.step_folders(root)}
    assert sorted(held) == ["step_0000002", "step_0000003", "step_0000004"]
    assert "optimizer.pt" in held["step_0000004"]
    assert held["step_0000002"] == held["step_0000003"] == [
        "model.safetensors", "rng.pt", "scheduler.pt", "state.json"
    ]  # fmt: skip
    older = checkpoint.load_trained(tmp_path, step=2)
    assert not torch.equal(older.adapter.w1, checkpoint.load_trained(tmp_path).adapter.w1)
    assert loop.train(_cfg(tmp_path, tone_corpus, resume=True, **kw))["steps"] == 4  # from the newest
    shutil.rmtree(root / "step_0000004")
    (root / "latest").write_text("step_0000003")
    with pytest.raises(ValueError, match=r"step_0000003 keeps the weights only .*--full-checkpoints.*--overwrite"):
        loop.train(_cfg(tmp_path, tone_corpus, resume=True, **kw))


def test_router_lr_expert_init_step_zero_and_resuming_a_run_from_before_them(tmp_path, tone_corpus):
    """router_lr_scale gives the routers their own AdamW group (lr x scale, the schedule on top);
    expert_init reaches the adapter; load_trained(step=0) is the run's initialization; a run whose
    config.json predates these fields (it ran with their defaults) still resumes."""
    cfg = _cfg(tmp_path, tone_corpus, max_steps=2, eval_every=0, save_every=1, keep_checkpoints=3)
    cfg.router_lr_scale = 0.1
    cfg.model.expert_init = "replicated"
    loop.train(cfg)
    groups = torch.load(tmp_path / "checkpoints/step_0000002/optimizer.pt", weights_only=True)["param_groups"]
    assert len(groups) == 2 and len(groups[1]["params"]) == 1  # the one MoE adapter's router
    assert groups[0]["initial_lr"] == 3e-3 and groups[1]["initial_lr"] == pytest.approx(3e-4)  # peak lr
    init, final = checkpoint.load_trained(tmp_path, step=0), checkpoint.load_trained(tmp_path)
    fresh = loop.build_model(cfg.model, seed=cfg.seed)
    for (name, p0), p1, pf in zip(init.named_parameters(), fresh.parameters(), final.parameters(), strict=True):
        assert torch.equal(p0, p1), name
        if name.startswith("adapter.") and "norm" not in name:
            assert not torch.equal(p0, pf), f"{name} did not train"
    assert all(torch.equal(init.adapter.w1[e], init.adapter.w1[0]) for e in range(8))
    assert not torch.equal(final.adapter.w1[1], final.adapter.w1[0])  # the copies diverged
    with pytest.raises(ValueError, match=r"router_lr_scale must be a positive"):
        TrainConfig(train_manifest="x", router_lr_scale=0.0)
    # An older run: its config.json lacks the new fields; resuming it with the defaults works.
    old = tmp_path / "old"
    loop.train(_cfg(old, tone_corpus, max_steps=2, eval_every=0, save_every=1))
    assert len(torch.load(old / "checkpoints/step_0000002/optimizer.pt", weights_only=True)["param_groups"]) == 1
    saved = json.loads((old / "config.json").read_text())
    del saved["router_lr_scale"], saved["model"]["expert_init"]
    (old / "config.json").write_text(json.dumps(saved))
    assert loop.train(_cfg(old, tone_corpus, max_steps=2, eval_every=0, save_every=1, resume=True))["steps"] == 2


def test_a_folder_in_use_is_refused_by_name_and_freed_when_its_holder_dies(tmp_path, tone_corpus):
    """A second run in a folder where one trains is refused before anything is written, naming
    the holder; the lock dies with its process (SIGKILL: no stale lock). A process that holds
    the folder's lock stands in for the training (test_train.py shows a real run holds it)."""
    base = dict(max_steps=2, eval_every=0, save_every=0)
    loop.train(_cfg(tmp_path, tone_corpus, **base))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert before[".lock"] == b""  # released: no holder named
    hold = (
        "import sys, time; from pathlib import Path; from adapter.lalm.training.runs import RunFolderLock; "
        "lock = RunFolderLock(Path(sys.argv[1])); assert lock.acquire() is None; print('held', flush=True); "
        "time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for cfg in (_cfg(tmp_path, tone_corpus, resume=True, **base), _cfg(tmp_path, tone_corpus, **base)):
            with pytest.raises(ValueError, match=rf"in use by another training run \(pid {holder.pid} on "):
                loop.train(cfg)
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    finally:
        holder.kill()
        holder.wait()
    assert loop.train(_cfg(tmp_path, tone_corpus, resume=True, **base))["steps"] == 2


def test_the_lock_is_taken_before_a_new_folder_is_written(tmp_path, tone_corpus, monkeypatch):
    """A fresh folder: the lock comes with the folder, before config.json; a run that appeared in the
    folder between the checks and the lock is refused, not overwritten."""
    out = tmp_path / "new"
    seen = {}
    real_write = loop.atomic_write_text

    def spy(path, text):
        if path.name == "config.json":
            seen["holder"] = (out / ".lock").read_text()
        real_write(path, text)

    monkeypatch.setattr(loop, "atomic_write_text", spy)
    loop.train(_cfg(out, tone_corpus, max_steps=1, eval_every=0, save_every=0))
    assert seen["holder"].startswith(f"pid {__import__('os').getpid()} on ")
    real_latest = checkpoint.Checkpointer.latest
    calls = []

    def appears(self):  # the second look finds a checkpoint the first did not
        calls.append(1)
        return None if len(calls) == 1 else real_latest(self)

    monkeypatch.setattr(checkpoint.Checkpointer, "latest", appears)
    other = tmp_path / "other"
    loop.train(_cfg(other, tone_corpus, max_steps=1, eval_every=0, save_every=0))  # makes step 1
    calls.clear()
    with pytest.raises(ValueError, match="a run that started there meanwhile"):
        loop.train(_cfg(other, tone_corpus, max_steps=1, eval_every=0, save_every=0, overwrite=True))


DAMAGE_RUN = dict(max_steps=4, eval_every=0, save_every=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def run_with_two_checkpoints(module_tmp_path, tone_corpus):
    out = module_tmp_path / "two-checkpoints"
    out.mkdir()
    loop.train(_cfg(out, tone_corpus, **DAMAGE_RUN))
    return out


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"])
def test_a_damaged_checkpoint_is_named_with_the_way_back(tmp_path, tone_corpus, damaged, run_with_two_checkpoints):
    """Saves are atomic, so only something outside (a partial copy, a failing disk) damages one.
    The resume names the file and the earlier checkpoint; following that advice resumes from it,
    and the folder set aside is neither taken for a checkpoint nor pruned."""
    run = tmp_path / "run"
    shutil.copytree(run_with_two_checkpoints, run)
    step4 = run / "checkpoints" / "step_0000004"
    (step4 / damaged).write_bytes((step4 / damaged).read_bytes()[:40])
    with pytest.raises(ValueError) as info:
        loop.train(_cfg(run, tone_corpus, resume=True, **DAMAGE_RUN))
    msg = str(info.value)
    assert msg.startswith(f"cannot read the checkpoint file {step4 / damaged} (") and msg.endswith(
        f"delete {step4} or move it out of {step4.parent}, and --resume continues from step_0000002"
    ), msg
    step4.rename(step4.with_name("step_0000004.bad"))  # set aside beside the others, by hand
    assert run_folder.checkpoint_steps(run) == [2]
    assert loop.train(_cfg(run, tone_corpus, resume=True, **DAMAGE_RUN))["steps"] == 4
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000004", "step_0000004.bad"], names


def test_where_nothing_can_lock_a_run_still_trains_and_says_so(tmp_path, monkeypatch):
    """No fcntl (Windows) or a file system that refuses locks (ENOLCK on some network mounts): the
    lock warns that nothing guards the folder and lets the run go on."""
    import errno
    import fcntl

    def refuse(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match=r"cannot lock .*\.lock \(\[Errno \d+\] No locks available\)"):
        assert run_folder.RunFolderLock(tmp_path).acquire() is None
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    with pytest.warns(UserWarning, match="no fcntl on this platform"):
        assert run_folder.RunFolderLock(tmp_path).acquire() is None


def test_a_disk_too_small_for_the_checkpoints_is_said_before_the_first_step(tmp_path, tone_corpus, monkeypatch):
    """The estimate is (kept + 1) checkpoints of 12 bytes per trained parameter (an fp32 weight and
    AdamW's two moments); a run whose folder has less free space warns before it trains."""
    real = shutil.disk_usage
    free = {"bytes": 10**12}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free["bytes"]))
    assert checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=2) is None
    free["bytes"] = 35_999
    short = checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=2)
    assert "0.00 GB free" in short and "(2 kept, 2 with the optimizer state, + the one being saved - 0 there" in short
    free["bytes"] = 36_000  # exactly 3 x 12,000
    assert checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=2) is None
    free["bytes"] = 12_000  # a resume that finds its 2 checkpoints needs room for one more
    assert checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=2, existing=2) is None
    assert checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=2, existing=1) is not None
    # --full-checkpoints 1 of 4 kept: the newest and the one being saved 12,000 each, 3 x 4,000 (weights).
    free["bytes"] = 36_000
    assert checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=4, full=1) is None
    assert checkpoint.checkpoint_disk_shortfall(tmp_path, trained=1000, keep=4) is not None  # 60,000 all full
    free["bytes"] = 35_999
    assert "4 kept, 1 with the optimizer state" in checkpoint.checkpoint_disk_shortfall(
        tmp_path, trained=1000, keep=4, full=1
    )

    free["bytes"] = 50_000_000  # the CI-size run's checkpoints are 40 MB each (3.35 M trained parameters)
    said = r"has 0.05 GB free, .* about 0.12 GB more \(2 kept"
    early = tmp_path / "early"
    with warnings.catch_warnings():  # as an error, it is raised where it is said: before any step
        warnings.filterwarnings("error", message=".*checkpoints need about")
        with pytest.raises(UserWarning, match=said):
            loop.train(_cfg(early, tone_corpus, max_steps=1, eval_every=0, save_every=0))
    assert not (early / "log.jsonl").exists() and not (early / "checkpoints").exists()
    with pytest.warns(UserWarning, match=said):  # a warning: the run goes on
        summary = loop.train(_cfg(tmp_path / "on", tone_corpus, max_steps=1, eval_every=0, save_every=0))
    assert summary["steps"] == 1
    # Resumed (finished, it saves its last step again), its checkpoint is already on the disk: 90 MB
    # free hold the 2 more it may need.
    free["bytes"] = 90_000_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = _cfg(tmp_path / "on", tone_corpus, max_steps=1, eval_every=0, save_every=0, resume=True)
        assert loop.train(cfg)["steps"] == 1
    assert not [w for w in caught if "checkpoints need about" in str(w.message)]


def test_the_codebook_sample_is_gathered_clip_by_clip_from_the_rows_randperm_picks(tmp_path, tone_corpus):
    """fit_semantic no longer concatenates every clip's frames (at scale they do not fit in memory):
    it reads clip by clip the rows that randperm picks out of the concatenation. Same rows, same
    order, so the codebook is bit-identical to fitting on the concatenation indexed by that randperm
    (the same computation on the same rows)."""
    from adapter.lalm.data import FeatureSource, read_manifest

    cfg = _cfg(tmp_path, tone_corpus)
    cfg.model.semantic_codes = 8
    examples = read_manifest(tone_corpus[0])
    fitted, reference = (loop.build_model(cfg.model, seed=0) for _ in range(2))
    source = FeatureSource(80, encoder=fitted.encoder)
    every_frame = torch.cat([source.features(ex) for ex in examples])
    assert every_frame.shape[0] > 37  # the sampling path
    setup.fit_semantic(fitted, examples, source, seed=3, max_frames=37)
    pick = torch.randperm(every_frame.shape[0], generator=torch.Generator().manual_seed(3))[:37]
    reference.semantic.fit(every_frame[pick], seed=3)
    assert torch.equal(fitted.semantic.codebook, reference.semantic.codebook)
    few = FeatureSource(80, encoder=fitted.encoder)  # fewer frames than max_frames: all of them
    setup.fit_semantic(fitted, examples[:2], few, seed=3)
    reference.semantic.fit(torch.cat([few.features(ex) for ex in examples[:2]]), seed=3)
    assert torch.equal(fitted.semantic.codebook, reference.semantic.codebook)


def test_features_in_memory_in_several_processes_are_warned_of_with_their_size(tmp_path, tone_corpus):
    from adapter.lalm.data import read_manifests

    cfg = _cfg(tmp_path, tone_corpus)
    model = loop.build_model(cfg.model)
    examples = read_manifests(f"{tone_corpus[0]}*2")  # a clip listed twice is encoded and kept once
    frames = sum(ex.num_frames for ex in examples) // 2
    gib = 4 * model.encoder.stacked_dim * frames / 2**30
    said = setup.feature_memory_warning(cfg, examples, model, world=4)
    assert f"features of {frames} frames take {gib:.1f} GiB in memory in each of the 4 process(es)" in said
    assert "--feature-cache DIR" in said
    assert setup.feature_memory_warning(cfg, examples, model, world=1) is None  # small, one process
    cached = dataclasses.replace(cfg, feature_cache=str(tmp_path / "features"))
    assert setup.feature_memory_warning(cached, examples, model, world=4) is None


def test_a_clip_longer_than_the_llm_takes_is_refused_before_training(tmp_path, tone_corpus):
    """Issue 39 item 10: a 5.5-minute clip (4,125 audio positions past the tiny LLM's 4,096) crashed
    training at the step that met it, again on every --resume, naming no file."""
    import numpy as np
    import soundfile as sf

    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(330 * 8000, dtype=np.int16), 8000, subtype="PCM_16")  # 330 s at 8 kHz
    manifest = tmp_path / "train.jsonl"
    rows = [json.loads(ln) for ln in tone_corpus[0].read_text().splitlines()[:3]]
    rows = [{**r, "audio": str(tone_corpus[0].parent / r["audio"])} for r in rows]
    rows.append({"id": "long", "audio": str(long), "question": "Is the tone high or low?", "answer": "low"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = _cfg(out, (manifest, tone_corpus[1]), max_steps=1)
    with pytest.raises(
        ValueError,
        match=r"train.jsonl:4: \d+ positions \(4125 audio frames of a 330.0 s clip.*"
        r"exceed the LLM's 4096 .*crop the clip to at most 32\d s",
    ):
        loop.train(cfg)
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()  # nothing written


def test_check_lengths_counts_prompt_answer_and_the_longest_choice():
    from adapter.lalm.data import Example, answer_ids, check_lengths, prompt_ids
    from adapter.lalm.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2-offline")
    ex = Example(id="a", question="Which?", answer="x", choices=["x", "a much longer option than x"], source="m:1")
    need = len(prompt_ids(tok, 0, "Which?")) + len(answer_ids(tok, "a much longer option than x"))
    check_lengths([ex], tok, need)
    with pytest.raises(ValueError, match=rf"m:1: {need} positions .* exceed the LLM's {need - 1}"):
        check_lengths([ex], tok, need - 1)
    check_lengths([ex], tok, need - 1, with_answer=False)  # a prompt alone fits
    check_lengths([ex], tok, None)


def test_label_routing_takes_categories_in_any_case_and_refuses_others_by_line(tmp_path, tone_corpus, capsys):
    """Issue 39 item 15: category "Sound" (case) under label routing, and `evaluate --audio` on a
    label-routed run, ended in raw Python errors without a file or line."""
    from adapter.lalm import evaluate as ev

    rows = [json.loads(ln) for ln in tone_corpus[0].read_text().splitlines()[:8]]
    rows = [{**r, "audio": str(tone_corpus[0].parent / r["audio"]), "category": "Sound"} for r in rows]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ModelConfig(encoder="demo", audio_dim=32, tiny_llm_hidden=64, adapter_backend="torch",
                        adapter="moe-8c4", num_experts=12, routing="label")  # fmt: skip
    run = tmp_path / "run"
    loop.train(_cfg(run, (manifest, tone_corpus[1]), model=model, max_steps=1, val_manifest=""))
    rows[5]["category"] = "noise"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"train.jsonl:6: the adapter routes by audio category .* got 'noise'"):
        loop.train(_cfg(tmp_path / "other", (manifest, tone_corpus[1]), model=model, max_steps=1, val_manifest=""))
    assert not (tmp_path / "other" / "config.json").exists()
    clip = rows[0]["audio"]
    with pytest.raises(SystemExit):
        ev.main(["--run", str(run), "--audio", clip])
    assert "routes by audio category (routing='label'): give --category" in capsys.readouterr().err
    assert ev.main(["--run", str(run), "--audio", clip, "--category", "sound", "--max-new-tokens", "2"]) == 0


def test_a_config_file_whose_model_is_null_is_named(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"train_manifest": "m.jsonl", "model": None}))
    with pytest.raises(ValueError, match="model must be a ModelConfig .*, got None"):
        train_config_from_argv(["--config", str(cfg_path)])
