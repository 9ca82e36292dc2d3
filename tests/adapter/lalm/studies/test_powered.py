"""adapter/lalm/studies/powered.py: the pre-registered rule, the readings from per-item rows, the
pinned setting, and the whole runner at the tiny size (issue 40)."""

import json

import pytest

from adapter.lalm.studies import powered
from tests.adapter.lalm.conftest import tiny_experiment_argv


@pytest.mark.parametrize(
    "low, high, verdict",
    [(0.001, 0.05, "better"), (-0.009, 0.02, "non-inferior"), (-0.011, 0.02, "inconclusive"), (-0.05, -0.001, "worse")],
)
def test_the_decision_rule_is_the_pre_registered_one(low, high, verdict):
    assert powered.MARGIN == -0.01 and powered.decide(low, high) == verdict


def _rows(seed, arm, n_right, n_wrong, task="speech/gender"):
    cat, name = task.split("/")
    rows = [{"correct": True} for _ in range(n_right)] + [{"correct": False} for _ in range(n_wrong)]
    return [
        {**r, "seed": seed, "arm": arm, "id": f"{task}-{i}", "category": cat, "task": name} for i, r in enumerate(rows)
    ]


def test_readings_come_from_the_item_rows_on_the_primary_tasks():
    rows = []
    for seed, (moe, dense) in {0: (8, 6), 1: (9, 6), 2: (7, 6)}.items():  # of 10 items each
        rows += _rows(seed, "moe", moe, 10 - moe) + _rows(seed, "dense", dense, 10 - dense)
        # A ceiling task both get right: not primary, so it moves no primary number.
        rows += _rows(seed, "moe", 10, 0, "music/tempo") + _rows(seed, "dense", 10, 0, "music/tempo")
    s = powered.summarize(rows)
    assert s["arms"]["moe"]["primary"] == [0.8, 0.9, 0.7] and s["arms"]["dense"]["primary"] == [0.6] * 3
    assert s["arms"]["moe"]["all_tasks"] == [0.9, 0.95, 0.85]
    c = s["comparisons"]["moe - dense"]
    assert c["diffs"] == pytest.approx([0.2, 0.3, 0.1]) and c["mean"] == pytest.approx(0.2)
    # +20 points on average, but over 3 seeds with an SD of 10 the t interval is [-4.8, +44.8]: the
    # seed-level rule cannot tell, though the pooled items (30 paired) lean one way.
    assert c["ci"] == pytest.approx([-0.0484, 0.4484], abs=1e-3) and c["verdict"] == "inconclusive"
    assert c["items_pooled"]["n"] == 30
    assert c["items_pooled"]["diff"] == pytest.approx(0.2)


def test_a_study_continues_only_where_it_started(tmp_path):
    info = {"device": "CPU: x", "device_detail": "avx2", "torch": "2.13.0", "git_sha": "abc", "threads": 2}
    powered.check_same_setting(tmp_path, info)
    powered.check_same_setting(tmp_path, info)  # the same: on
    with pytest.raises(ValueError, match=r"threads: 2 -> 1"):
        powered.check_same_setting(tmp_path, {**info, "threads": 1})
    with pytest.raises(ValueError, match=r"git_sha: 'abc' -> 'def'"):
        powered.check_same_setting(tmp_path, {**info, "git_sha": "def"})


def test_the_runner_end_to_end_at_the_tiny_size(tmp_path, ci_corpus):
    argv = ["--seeds", "7", "--max-steps", "2", "--checkpoints", "1", "--threads", "1", "--quiet", "--resume"]
    argv += tiny_experiment_argv(out=tmp_path / "runs", corpus=tmp_path / "corpus")
    assert powered.main(argv) == 0
    rows = powered.read_predictions(tmp_path / "runs" / "predictions.jsonl.gz")
    assert {r["arm"] for r in rows} == set(powered.ARMS) and {r["seed"] for r in rows} == {7}
    assert all(isinstance(r["option_logprobs"], list) for r in rows if r["task"] != "knowledge")
    frozen = json.loads((tmp_path / "runs" / "seed-7" / "moe-frozen" / "config.json").read_text())
    assert frozen["model"]["routing"] == "frozen" and frozen["model"]["adapter"] == "moe-8c4-parallel"
    active = json.loads((tmp_path / "runs" / "seed-7" / "dense-active" / "config.json").read_text())
    assert active["model"]["adapter"] == "dense-active"
    text = (tmp_path / "runs" / "powered.md").read_text()
    assert "moe - moe-frozen" in text and "too few seeds" in text  # one seed: no verdict
    assert powered.main(argv) == 0  # resumed: every run reused, the same files
    assert powered.read_predictions(tmp_path / "runs" / "predictions.jsonl.gz") == rows


def test_jobs_train_seeds_in_processes_of_their_own_at_one_thread_count(tmp_path, ci_corpus):
    """Issue 40 item 2: independent runs in parallel processes (one thread each on 2 cores)."""
    argv = ["--seeds", "7", "8", "--arms", "dense", "--max-steps", "2", "--checkpoints", "1", "--quiet"]
    argv += ["--jobs", "2", *tiny_experiment_argv(out=tmp_path / "runs", corpus=tmp_path / "corpus")]
    assert powered.main(argv) == 0
    for seed in (7, 8):
        ev = json.loads((tmp_path / "runs" / f"seed-{seed}" / "dense" / "eval.json").read_text())
        assert ev["threads"] == max(1, __import__("torch").get_num_threads() // 2)
    assert json.loads((tmp_path / "runs" / "study.json").read_text())["threads"] == ev["threads"]
