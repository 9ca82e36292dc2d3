"""adapter/lalm/studies/experiment.py: a run's training time is summed over the calls that trained it,
a call stopped by a signal included."""

import dataclasses
import json
import signal
import time

import pytest

from adapter.cli import Stopped
from adapter.lalm.studies import experiment


def test_a_stopped_call_keeps_its_time_for_the_resume(tmp_path, tiny_experiment, monkeypatch):
    exp = tiny_experiment(steps=2)
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
    result = experiment.train_and_evaluate(dataclasses.replace(exp, resume=True), "dense", manifests)
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
