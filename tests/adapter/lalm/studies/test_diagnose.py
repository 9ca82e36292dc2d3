"""The diagnostics of issue 21 on tiny trained runs: probes, routing over training, gradients and
drift per part, the report files; and the probe itself on data whose answer is known."""

import json
from pathlib import Path

import pytest
import torch

from adapter.lalm.studies import diagnose
from adapter.lalm.training.loop import train


def test_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 20
    centers = {"a": 0.0, "b": 10.0, "c": -10.0}  # 10 noise sds apart: separable on column 2
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    X[:, 2] += torch.tensor([centers[y] for y in labels], dtype=torch.float64)
    assert diagnose.probe_accuracy(X[:45], labels[:45], X[45:], labels[45:]) == 1.0
    noise = torch.randn(60, 5, generator=g, dtype=torch.float64)  # features unrelated to the labels
    assert diagnose.probe_accuracy(noise[:45], labels[:45], noise[45:], labels[45:]) < 0.7


@pytest.fixture(scope="module")
def tiny_runs(module_tmp_path, ci_corpus):
    from adapter.lalm.studies.experiment import ExperimentConfig
    from tests.adapter.lalm.conftest import TINY_EXPERIMENT

    root = module_tmp_path
    exp = ExperimentConfig.of(
        **{
            **TINY_EXPERIMENT,
            "out": str(root),
            "corpus": str(ci_corpus),
            "quiet": True,
            "max_steps": 4,
            "checkpoints": 2,
        }
    )
    manifests = exp.build_corpus()
    for preset in ("dense", "moe-8c4"):
        train(exp.train_config(preset, manifests, root / preset))
    return root


def test_cli_measures_every_part_at_every_checkpoint(tiny_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert diagnose.main([str(tiny_runs / "moe-8c4"), str(tiny_runs / "dense"), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "diagnose.json").read_text())
    moe, dense = results
    assert (moe["label"], dense["label"]) == ("moe-8c4", "dense") and moe["steps"] == [0, 2, 4]
    for r in results:
        assert set(r["probes"]) == {"init", "final"}
        for stage in r["probes"].values():
            assert set(stage) == set(diagnose.PROBE_TASKS)  # the CI corpus has every probe task
            for accs in stage.values():
                assert set(accs) == {f"{s}/{p}" for s in diagnose.SITES for p in diagnose.POOLINGS}
                assert all(0.0 <= a <= 1.0 for a in accs.values())
        # Bug hunt: every part gets a gradient at every checkpoint, and every part moved.
        for g in r["grad_norm"]:
            assert all(v > 0 for k, v in g.items() if k != "step"), g
        assert all(v == 0 for k, v in r["drift"][0].items() if k != "step")
        moved = {k: v > 0 for k, v in r["drift"][-1].items() if k != "step"}
        # In 4 steps an expert may receive no token (then it rightly stays put); the rest all move.
        assert all(v for k, v in moved.items() if not k.startswith("expert")), r["drift"][-1]
        assert any(v for k, v in moved.items() if k.startswith("expert")) or r is dense
    assert {f"expert{e}" for e in range(8)} | {"router", "agg_up", "agg_down", "fusion"} <= set(moe["grad_norm"][0])
    assert {"up", "down", "fusion"} <= set(dense["grad_norm"][0]) and not dense["routing"]
    routing = moe["routing"]
    assert [x["step"] for x in routing] == [0, 2, 4] and routing[0]["churn"] is None
    for x in routing:
        assert 0 < x["entropy"] <= 1 and len(x["gates"]) == 4
        assert x["gates"] == sorted(x["gates"], reverse=True) and sum(x["gates"]) == pytest.approx(1, abs=1e-5)
    # No order between the two: a token can keep its expert set while its first expert changes.
    assert all(0 <= x["churn"] <= 1 and 0 <= x["top1_churn"] <= 1 for x in routing[1:])
    md = (out / "diagnose.md").read_text()
    assert "| moe-8c4 | final | middle |" in md and "| dense | init | input |" in md and "| moe-8c4 | 4 |" in md
    assert (out / "diagnose.png").stat().st_size > 1000
    assert "Linear probes" in capsys.readouterr().out


def test_cli_refuses_a_folder_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        diagnose.main([str(Path(tmp_path))])
    assert "not run folders" in capsys.readouterr().err


def test_run_features_use_the_runs_cache_only_where_it_exists(tiny_runs, tmp_path, monkeypatch):
    from adapter.lalm.training.checkpoint import load_trained, run_features

    run = tiny_runs / "moe-8c4"
    model = load_trained(run)
    cache = json.loads((run / "config.json").read_text())["feature_cache"]
    assert run_features(run, model).cache_dir.parent == Path(cache)  # <cache>/<encoder fingerprint>
    saved = json.loads((run / "config.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps({**saved, "feature_cache": "no/such/folder"}))
    monkeypatch.chdir(tmp_path)
    assert run_features(moved, model).cache_dir is None and not (tmp_path / "no").exists()


def test_splits_come_from_the_run_never_from_the_working_directory(tiny_runs, tmp_path, monkeypatch, capsys):
    """Issue 39 item 1: diagnose read train.jsonl / test.jsonl from the folder of the run's val
    manifest, which for a run trained without --val-manifest is the working directory: it analysed
    whatever corpus lay there. Now: the run's recorded training manifest, the test.jsonl beside it
    (or --test-manifest), or a refusal."""
    run = tmp_path / "no-val"
    run.mkdir()
    cfg = json.loads((tiny_runs / "dense" / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "val_manifest": ""}))
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "train.jsonl").write_text('{"id": "decoy", "question": "q"}\n')
    (decoy / "test.jsonl").write_text('{"id": "decoy", "question": "q"}\n')
    monkeypatch.chdir(decoy)
    spec, test = diagnose.run_splits(run)
    assert spec == cfg["train_manifest"] and test == Path(cfg["train_manifest"].split(",")[0]).parent / "test.jsonl"
    train_ex = diagnose.read_training_examples(spec)
    assert train_ex and "decoy" not in {ex.id for ex in train_ex}
    assert len({ex.source for ex in train_ex}) == len(train_ex)  # the weighted text manifest: each line once
    other = tmp_path / "other-test.jsonl"
    other.write_text('{"id": "t", "question": "q"}\n')
    assert diagnose.run_splits(run, other) == (spec, other)
    (run / "config.json").write_text(json.dumps({**cfg, "train_manifest": "gone/train.jsonl"}))
    with pytest.raises(ValueError, match=r"no-val: the training manifest it recorded, 'gone/train.jsonl', is not"):
        diagnose.run_splits(run)
    with pytest.raises(SystemExit):
        diagnose.main([str(run), "--out", str(tmp_path / "out")])
    assert "gone/train.jsonl" in capsys.readouterr().err
