"""The interference runner at CI size: each category alone and jointly with the same passes over
its items, paired alone - joint per category, the fixed decision rule, resume, and the report."""

import json

import pytest

from adapter.lalm.data import read_manifest
from adapter.lalm.studies import interference
from tests.adapter.lalm.conftest import tiny_experiment_argv


@pytest.mark.slow
def test_alone_and_joint_runs_are_paired_per_category(tmp_path, tiny_experiment, ci_corpus, capsys):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "seed-0").symlink_to(ci_corpus)  # the session's CI corpus serves as seed 0's
    # One checkpoint per run (kept with its predecessor): the runner reads only the last, and the
    # default's five per run had this test write 1.3 GB.
    exp = tiny_experiment(corpus=str(corpora), out=str(tmp_path / "runs"), checkpoints=1)
    manifests = interference.category_manifests(_corpus(ci_corpus))
    tests = {s: read_manifest(m["test"]) for s, m in manifests.items()}
    assert {ex.category for ex in tests["joint"]} == set(interference.CATEGORIES)
    assert all(ex.eval == "mmau" for ex in tests["joint"])  # no spoken knowledge, no text
    for c in interference.CATEGORIES:
        assert {ex.category for ex in tests[c]} == {c}
    assert sum(len(tests[c]) for c in interference.CATEGORIES) == len(tests["joint"])

    results = interference.run_interference(exp, ["dense"], [0], epochs=2, equal_steps=True)
    runs = results[0]["dense"]
    steps = {s: runs[s]["steps"] for s in interference.SETTINGS}
    n = {s: len(read_manifest(manifests[s]["train"])) for s in interference.SETTINGS}
    assert steps == {s: interference.steps_for(n[s], 2, exp.run.max_batch_size) for s in interference.SETTINGS}
    assert abs(steps["joint"] - sum(steps[c] for c in interference.CATEGORIES)) <= len(interference.CATEGORIES)
    for c in interference.CATEGORIES:  # the control: alone, as many steps as the joint run, on c's items only
        control = runs[f"{c}-{interference.EQUAL_STEPS}"]
        assert control["steps"] == steps["joint"]
        assert {r["category"] for r in control["eval"]["predictions"]} == {c}
    assert {r["category"] for r in runs["music"]["eval"]["predictions"]} == {"music"}

    summary = interference.summarize(results, ["dense"])
    for c in interference.CATEGORIES:
        for key in interference.SCORINGS:
            row = summary["presets"]["dense"]["categories"][c][key]
            alone = [r[key] for r in runs[c]["eval"]["predictions"]]
            joint = [r[key] for r in runs["joint"]["eval"]["predictions"] if r["category"] == c]
            assert row["n"] == len(alone) and row["diff"] == pytest.approx((sum(alone) - sum(joint)) / len(alone))
            assert row["low"] <= row["diff"] <= row["high"]
            assert row["verdict"] == interference.verdict(
                interference.PairedDiff(
                    **{k: row[k] for k in ("diff", "low", "high", "p_mcnemar", "a_only", "b_only", "n")}
                )
            )
    equal = summary["presets"]["dense"]["equal_steps"]
    for c in interference.CATEGORIES:
        alone = [r["correct_ll"] for r in runs[f"{c}-{interference.EQUAL_STEPS}"]["eval"]["predictions"]]
        joint = [r["correct_ll"] for r in runs["joint"]["eval"]["predictions"] if r["category"] == c]
        assert equal[c]["correct_ll"]["diff"] == pytest.approx((sum(alone) - sum(joint)) / len(alone))
    text = interference.markdown(summary, exp, 2)
    assert interference.RULE in text and "## dense" in text and "joint run's steps" in text

    # The CLI on the same folders with --resume reuses every run and writes the report.
    capsys.readouterr()
    argv = ["--presets", "dense", "--seeds", "0", "--epochs", "2", "--alone-steps", "joint", "--resume", "--quiet"]
    argv += tiny_experiment_argv(corpus=corpora, out=tmp_path / "runs", checkpoints=1)
    assert interference.main(argv + ["--test-per-task", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished, evaluated run") == len(interference.SETTINGS) + len(interference.CATEGORIES)
    saved = json.loads((tmp_path / "runs" / "interference.json").read_text())
    assert saved["presets"]["dense"]["categories"] == json.loads(json.dumps(summary["presets"]["dense"]["categories"]))
    assert (tmp_path / "runs" / "interference.md").is_file()


def _corpus(root):
    return {s: root / f"{s}.jsonl" for s in ("train", "val", "test", "text")}


def test_verdicts_follow_the_fixed_rule():
    d = lambda lo, hi: interference.PairedDiff((lo + hi) / 2, lo, hi, 0.5, 1, 1, 10)  # noqa: E731
    assert interference.verdict(d(0.01, 0.05)) == "interference"
    assert interference.verdict(d(-0.05, -0.01)) == "transfer"
    assert interference.verdict(d(-0.01, 0.05)) == "neither"
    assert interference.steps_for(100, 2.5, 32) == 8 and interference.steps_for(1, 0.01, 32) == 1
