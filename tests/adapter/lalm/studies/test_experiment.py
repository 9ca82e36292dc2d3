"""adapter/lalm/studies/experiment.py: a run's training time is summed over the calls that trained it,
a call stopped by a signal included."""

import json
import signal
import time

import pytest

from adapter.cli import Stopped
from adapter.lalm.studies import experiment


def test_a_stopped_call_keeps_its_time_for_the_resume(tmp_path, tiny_experiment, monkeypatch):
    exp = tiny_experiment(max_steps=2)
    manifests = exp.build_corpus()
    timing = tmp_path / "runs" / "dense" / "train_seconds.json"
    real_train = experiment.train

    def stopped_train(cfg):
        (tmp_path / "runs" / "dense").mkdir(parents=True, exist_ok=True)
        time.sleep(0.5)
        raise Stopped("training stopped by SIGTERM after step 1", signal.SIGTERM)

    monkeypatch.setattr(experiment, "train", stopped_train)
    with pytest.raises(Stopped):
        experiment.train_and_evaluate(exp, "dense", manifests)
    stopped = json.loads(timing.read_text())["seconds"]
    assert 0.5 <= stopped < 5.0, stopped
    monkeypatch.setattr(experiment, "train", real_train)
    t0 = time.perf_counter()
    result = experiment.train_and_evaluate(exp.with_(resume=True), "dense", manifests)
    this_call = time.perf_counter() - t0  # training and evaluation: an upper bound of the training part
    assert stopped < result["seconds"] < stopped + this_call, (stopped, result["seconds"], this_call)
    assert json.loads(timing.read_text())["seconds"] == result["seconds"]
    # A fresh (not resumed) run starts its count again.
    fresh = experiment.train_and_evaluate(exp, "dense", manifests)
    assert fresh["seconds"] < this_call and json.loads(timing.read_text())["seconds"] == fresh["seconds"]


def test_every_experiment_cli_can_train_in_fp16_or_fp32(tmp_path):
    """The runners' --fp16 and --no-bf16 reach the training config: the ways out that training
    names on a GPU without bf16 (train.bf16_refusal) exist in the demo, seeds, ablation and the
    other runners."""
    import argparse

    for argv, want in (([], (True, False)), (["--no-bf16"], (False, False)), (["--fp16"], (True, True))):
        parser = argparse.ArgumentParser()
        experiment.add_experiment_args(parser)
        exp = experiment.experiment_from_args(parser.parse_args(argv))
        manifests = {"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl"}
        cfg = exp.train_config("dense", manifests, tmp_path / "run")
        assert (cfg.bf16, cfg.fp16) == want
        # Every evenly spaced checkpoint for the analyses, the optimizer state in the newest alone.
        assert (cfg.keep_checkpoints, cfg.full_checkpoints) == (exp.checkpoints + 1, 1)


def test_the_demo_run_is_trainconfig_with_the_experiment_budget(tmp_path):
    """One source per setting: a run of the default experiment is TrainConfig's defaults but for what
    EXPERIMENT_RUN and the experiment's own settings set (the demo's numbers depend on each)."""
    import dataclasses

    from adapter.lalm.config import ModelConfig, TrainConfig

    manifests = {"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl", "text": tmp_path / "text.jsonl"}
    cfg = experiment.ExperimentConfig().train_config("moe-8c4-parallel", manifests, tmp_path / "run")
    changed = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k != "model" and v != getattr(TrainConfig(), k) and k not in ("train_manifest", "val_manifest")
    }
    assert changed == {
        "output_dir": str(tmp_path / "run"),
        "feature_cache": str(tmp_path / "features"),
        "max_steps": 1500,
        "lr": 2e-3,
        "warmup_steps": 75,
        "max_batch_tokens": 32 * 160,
        "eval_every": 375,
        "save_every": 375,
        "keep_checkpoints": 5,
        "full_checkpoints": 1,
        "overwrite": True,
    }
    assert cfg.train_manifest == f"{manifests['train']},{manifests['text']}*4"
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v != getattr(ModelConfig(), k)}
    assert model == {"adapter": "moe-8c4-parallel", "audio_dim": 64, "semantic_codes": 64}


def test_run_flags_take_the_field_names_and_the_old_aliases():
    import argparse

    def parse(argv):
        p = argparse.ArgumentParser()
        experiment.add_experiment_args(p, out="runs/x")
        return experiment.experiment_from_args(p.parse_args(argv))

    short = parse(
        ["--steps", "7", "--batch-size", "5", "--llm-hidden", "64", "--llm-layers", "1", "--backend", "torch"]
    )
    long = parse(
        ["--max-steps", "7", "--max-batch-size", "5", "--tiny-llm-hidden", "64", "--tiny-llm-layers", "1"]
        + ["--adapter-backend", "torch"]
    )
    assert short == long and short.out == "runs/x"
    assert (short.run.max_steps, short.run.max_batch_size, short.run.model.tiny_llm_hidden) == (7, 5, 64)
    assert short.run.model.adapter_backend == "torch" and short.run.lr == 2e-3  # the rest: EXPERIMENT_RUN's
    assert parse([]) == experiment.ExperimentConfig(out="runs/x")
    with pytest.raises(TypeError, match=r"no flag for \['steps'\]"):  # a runner's default by an alias is no default
        experiment.add_experiment_args(argparse.ArgumentParser(), steps=800)
    with pytest.raises(TypeError, match=r"not a TrainConfig or ModelConfig field: \['steps'\]"):
        experiment.ExperimentConfig.of(steps=3)
    with pytest.raises(ValueError, match="max_steps must be > 0, got 0"):
        experiment.ExperimentConfig.of(max_steps=0)


def test_the_demo_and_the_seeds_runner_give_the_same_numbers_for_the_same_settings(tiny_experiment, monkeypatch):
    """Issue 40 item 5: the demo's seed 0 and the seeds runner's differed on one machine. Both now
    train through train_and_evaluate, which pins one thread count (recorded in eval.json); with the
    same settings their evaluations are the same to the bit (one process, one machine)."""
    from adapter.lalm import demo
    from adapter.lalm.studies import seeds

    pinned = []
    real_pin = experiment.pin_threads
    monkeypatch.setattr(experiment, "pin_threads", lambda exp: pinned.append(real_pin(exp)) or pinned[-1])
    exp = tiny_experiment(max_steps=2, threads=1)
    from_demo = demo.run_demo(exp)
    from_seeds = seeds.run_seeds(
        exp.with_(out=exp.out + "-seeds", corpus=exp.corpus + "-seeds"), list(demo.ADAPTERS), [0]
    )
    assert pinned == [1] * 4
    for name in demo.ADAPTERS:
        mine, theirs = from_demo["results"][name], from_seeds[0][name]
        assert mine["threads"] == theirs["threads"] == 1
        assert mine["mmau"] == theirs["mmau"] and mine["predictions"] == theirs["predictions"], name


def test_a_resume_at_another_thread_count_is_refused(tiny_experiment):
    exp = tiny_experiment(max_steps=2, threads=1)
    manifests = exp.build_corpus()
    experiment.train_and_evaluate(exp, "dense", manifests)
    with pytest.raises(ValueError, match=r"trained at 1 torch thread\(s\), this call at 2: pass --threads 1"):
        experiment.train_and_evaluate(exp.with_(resume=True, threads=2), "dense", manifests)
