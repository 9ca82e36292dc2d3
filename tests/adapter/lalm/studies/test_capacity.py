"""The frozen-backbone setting and the capacity sweep at CI size: the text stage reads captions
where audio will be, its LLM stays bit-for-bit frozen through every audio-stage run, variants are
sized equally, paired differences follow the fixed rules, and --resume reuses every run."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapter.lalm.data import read_manifest
from adapter.lalm.model import AUDIO_CATEGORIES
from adapter.lalm.studies import backbone, capacity
from adapter.lalm.training.checkpoint import load_trained
from adapter.lalm.training.runs import checkpoint_steps
from tests.adapter.lalm.conftest import tiny_experiment_argv


def _corpus(root):
    return {s: root / f"{s}.jsonl" for s in ("train", "val", "test", "text")}


def test_captions_replace_the_audio_of_every_item(ci_corpus):
    captions = backbone.caption_manifests(_corpus(ci_corpus))
    for split in ("train", "val", "test"):
        audio = read_manifest(ci_corpus / f"{split}.jsonl")
        text = read_manifest(captions[split])
        assert len(text) == len(audio) and all(ex.audio is None and ex.context for ex in text)
        assert [(ex.question, ex.answer, ex.task) for ex in text] == [(ex.question, ex.answer, ex.task) for ex in audio]
    with pytest.raises(ValueError, match="has no caption: rebuild the corpus"):
        backbone.caption_records([{"id": "old", "question": "q"}])


@pytest.mark.slow
def test_sweep_trains_the_adapter_on_a_frozen_text_backbone(tmp_path, tiny_experiment, ci_corpus, capsys):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "seed-0").symlink_to(ci_corpus)
    exp = tiny_experiment(corpus=str(corpora), out=str(tmp_path / "runs"), max_steps=4, checkpoints=1)
    variants = ("dense", "moe-label")
    result = capacity.run_sweep(exp, [0], text_steps=4, widths=(0.25, 1.0), variants=variants)

    seed_dir = tmp_path / "runs" / "seed-0"
    llm = AutoModelForCausalLM.from_pretrained(seed_dir / "backbone" / "llm", local_files_only=True)
    text_llm = load_trained(seed_dir / "backbone").llm.state_dict()
    assert all(torch.equal(v, text_llm[k]) for k, v in llm.state_dict().items())  # the exported copy
    for w in (0.25, 1.0):
        dense_total = result["runs"][0][w]["dense"]["params"]["total"]
        for v in variants:
            run = seed_dir / f"w{w:g}" / v
            model = load_trained(run)
            # The audio stage never moves the LLM: its weights are the backbone's, loaded, not trained.
            assert all(torch.equal(p, text_llm[k]) for k, p in model.llm.state_dict().items())
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["freeze_llm"] and cfg["train_adapter"] and cfg["model"]["adapter_width"] == w
            step = 12 * (32 + 64)  # one expert-width step at d = 32, D = 64
            assert abs(result["runs"][0][w][v]["params"]["total"] - dense_total) <= step / 2
        assert result["runs"][0][w]["moe-label"]["params"]["active"] < dense_total
    mech = result["runs"][0][1.0]["dense"]["mechanism"]
    assert [t["step"] for t in mech["cosine"]] == checkpoint_steps(seed_dir / "w1" / "dense")
    assert mech["influence"]["names"] and "mechanism" not in result["runs"][0][1.0]["moe-label"]
    rates = result["runs"][0][1.0]["moe-label"]["eval"]["expert_rates"]
    for i, c in enumerate(AUDIO_CATEGORIES):  # label routing: category i on its own 4 experts, all 4 active
        assert sum(rates[c][4 * i : 4 * i + 4]) == pytest.approx(4.0), rates

    summary = capacity.summarize(result)
    for w in (0.25, 1.0):
        comp = summary["table"][w]["comparisons"]["moe-label - dense"]["all"]
        a = [r["correct_ll"] for r in capacity.mmau_rows(result["runs"][0][w]["moe-label"]["eval"], None)]
        b = [r["correct_ll"] for r in capacity.mmau_rows(result["runs"][0][w]["dense"]["eval"], None)]
        assert comp["n"] == len(a) == len(b) and comp["diff"] == pytest.approx((sum(a) - sum(b)) / len(a))
        assert comp["verdict"] == capacity.word(capacity.PairedDiff(**{k: comp[k] for k in comp if k != "verdict"}))
    assert set(summary["bottleneck"]) == set(variants)
    text = capacity.markdown(summary, exp, 4)
    assert all(rule in text for rule in capacity.RULES.values()) and "## Findings" in text
    # The mechanism table: cosine and cross-category influence at each width, of dense only here
    # (the learned MoE, the other analysed variant, is not in this sweep: no expert-rate figure).
    assert "## Mechanism" in text and {w: set(r) for w, r in summary["influence"].items()} == {
        0.25: {"dense"},
        1.0: {"dense"},
    }
    assert summary["expert_rates"] == {}

    capsys.readouterr()
    argv = ["--seeds", "0", "--text-steps", "4", "--widths", "0.25", "1", "--variants", *variants, "--resume"]
    argv += tiny_experiment_argv(steps=4, checkpoints=1, corpus=corpora, out=tmp_path / "runs")
    assert capacity.main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().out.count("reusing the finished, evaluated run") == 1 + 2 * len(variants)
    saved = json.loads((tmp_path / "runs" / "capacity.json").read_text())["summary"]
    assert saved["table"]["1.0"]["comparisons"] == json.loads(json.dumps(summary["table"][1.0]["comparisons"]))
    assert (tmp_path / "runs" / "capacity.png").is_file() and not (tmp_path / "runs" / "capacity-experts.png").exists()


def test_rule_words():
    d = lambda lo, hi: capacity.PairedDiff((lo + hi) / 2, lo, hi, 0.5, 1, 1, 10)  # noqa: E731
    assert [capacity.word(d(0.01, 0.05)), capacity.word(d(-0.05, -0.01)), capacity.word(d(-0.01, 0.05))] == [
        "better",
        "worse",
        "tie",
    ]
    rates = {"speech": [1.0, 0.5], "music": [0.5, 0.5], "sound": [0.0, 1.0]}
    assert capacity.max_specialization(rates) == pytest.approx(2.0)
    track = [{"names": ["a", "b", "c"], "cosine": [[1, -0.2, 0.1], [-0.2, 1, -0.5], [0.1, -0.5, 1]]}]
    assert capacity.mean_pair_cosine(track) == pytest.approx(-0.2)
    assert capacity.mean_cross_influence({"score": [[1, -0.2, 0.1], [0.3, 1, -0.5], [0.1, -0.4, 1]]}) == pytest.approx(
        -0.1
    )
    assert capacity.mean_expert_rates([{"a": [0.2, 0.4]}, {"a": [0.4, 0.0]}]) == {"a": pytest.approx([0.3, 0.2])}
    conflict = {0.5: {"dense": -0.2, "moe": 0.1}, 2.0: {"dense": 0.02, "moe": 0.03}}
    summary = {"widths": [], "bottleneck": {}, "specialization": {}, "conflict": conflict}
    assert capacity.sentences(summary) == [
        "Width 0.5: dense's category gradients conflict (mean cosine -0.200), MoE's do not (+0.100): "
        "dense conflicts more than MoE.",
        "Width 2: dense's category gradients do not conflict (mean cosine +0.020), MoE's do not (+0.030): "
        "neither conflicts; dense's are less aligned than MoE's.",
    ]


def test_expert_rate_figure(tmp_path):
    """The learned MoE's per-category expert rates, one panel per width (paper Fig. 3)."""
    one = {c: [0.25 * (i % 4 == j % 4) for i in range(12)] for j, c in enumerate(AUDIO_CATEGORIES)}
    rates = {0.5: one, 2.0: one}
    capacity.plot_experts({"expert_rates": rates}, tmp_path / "experts.png")
    assert (tmp_path / "experts.png").stat().st_size > 1000
