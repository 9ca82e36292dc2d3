"""The multi-seed comparison: paired intervals computed right, runs reused, and the CLI end to end."""

import json

import pytest

from adapter.lalm.studies import seeds
from tests.adapter.lalm.conftest import TINY_EXPERIMENT


def _eval(overall, task_acc):
    return {"mmau": {"overall": overall, "per_category": {"sound": overall}, "per_task": {"sound/which": task_acc}}}


def test_paired_interval_by_hand():
    results = {
        0: {"dense": _eval(0.80, 0.9), "moe": _eval(0.60, 0.5)},
        1: {"dense": _eval(0.82, 0.9), "moe": _eval(0.70, 0.6)},
        2: {"dense": _eval(0.78, 0.8), "moe": _eval(0.65, 0.7)},
    }
    s = seeds.summarize(results, ["dense", "moe"])
    d = s["paired"]["moe"]
    assert d["diffs"] == pytest.approx([-0.20, -0.12, -0.13])
    # mean -0.15, sd 0.04359, t(0.975, 2) = 4.3027: half width 0.10829
    assert d["mean"] == pytest.approx(-0.15) and d["ci"] == pytest.approx([-0.25829, -0.04171], abs=1e-4)
    assert d["verdict"] == "worse"
    assert s["presets"]["moe"]["per_task"]["sound/which"] == pytest.approx(0.6)
    text = seeds.markdown(s)
    assert "| moe | -20.0 | -12.0 | -13.0 | -15.0 [-25.8, -4.2] | worse |" in text
    assert seeds.t_interval([0.5]) == (0.5, 0.5, 0.5)


def test_cli_runs_each_seed_on_its_own_corpus_and_reuses_finished_runs(tmp_path, capsys):
    args = ["--presets", "dense", "moe-8c4-parallel", "--seeds", "3", "--steps", "3", "--checkpoints", "1"]
    args += ["--out", str(tmp_path / "runs"), "--corpus", str(tmp_path / "corpus"), "--quiet"]
    for key, value in TINY_EXPERIMENT.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert seeds.main(args) == 0
    assert (tmp_path / "corpus" / "seed-3" / "train.jsonl").is_file()
    written = json.loads((tmp_path / "runs" / "seeds.json").read_text())
    assert written["seeds"] == [3] and set(written["presets"]) == {"dense", "moe-8c4-parallel"}
    capsys.readouterr()
    assert seeds.main(args) == 0  # everything reused: no training the second time
    assert capsys.readouterr().out.count("reusing") == 2
    with pytest.raises(SystemExit):
        seeds.main([*args, "--seeds", "1", "1"])
