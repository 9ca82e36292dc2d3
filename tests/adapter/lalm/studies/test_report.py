"""The ablation runner and the report: their arithmetic by hand, and one tiny run end to end."""

import json
import math

import pytest

from adapter.lalm.studies import report
from adapter.lalm.studies.ablation import describe
from adapter.lalm.studies.experiment import train_and_evaluate
from tests.adapter.lalm.conftest import TINY_EXPERIMENT


def test_difference_and_standard_error_by_hand():
    d, se = report.diff_se(0.6, 0.5, 100)
    assert d == pytest.approx(0.1)
    assert se == pytest.approx(math.sqrt((0.24 + 0.25) / 100))  # 0.07
    assert report.verdict(0.1, 0.07, +1).startswith("within noise")
    assert report.verdict(0.2, 0.07, +1) == "agrees"
    assert report.verdict(-0.2, 0.07, +1) == "disagrees"
    assert report.verdict(-0.2, 0.07, -1) == "agrees"
    assert report.sign_verdict(-0.1, -1) == "agrees" and report.sign_verdict(float("nan"), 1) == "zero / undefined"


def test_load_spread_and_specialization_by_hand():
    rates = {"speech": [2.0, 0.0], "sound": [1.0, 1.0], "music": [0.0, 2.0]}  # k = 2 of E = 2
    assert report.load_spread(rates, {"speech": 1, "sound": 1, "music": 1}) == 0.0
    # speech-heavy data: loads (2*3 + 1 + 0)/5 = 1.4 and 0.6 -> std 0.4, mean 1.0
    assert report.load_spread(rates, {"speech": 3, "sound": 1, "music": 1}) == pytest.approx(0.4)
    spec = report.specialization(rates)
    assert [x["top"] for x in spec["experts"]] == ["speech", "music"]
    assert [x["ratio"] for x in spec["experts"]] == [2.0, 2.0]
    assert spec["dominated"] == [0, 1] and spec["speech_and_music"] == []
    both = report.specialization({"speech": [0.9], "sound": [0.1], "music": [0.8]})
    assert both["speech_and_music"] == [0]


def test_describe_counts_parameters_like_the_presets():
    row = describe("moe-8c4", 64, 128)
    assert (row["experts"], row["top_k"], row["width"]) == (8, 4, 32)
    # The demo's adapters as built (d = 64 in, the tiny LLM's 128 out), counted from their modules:
    # 82,944 MoE (66,560 active) and 98,688 dense, not 66k each as with out_dim = d.
    from adapter.lalm.assemble import build_model
    from adapter.lalm.config import ModelConfig

    for name in ("moe-8c4", "dense"):
        built = build_model(
            ModelConfig(encoder="demo", adapter=name, audio_dim=64, tiny_llm_hidden=128, adapter_backend="torch")
        )
        counts = built.adapter.param_counts()
        assert (describe(name, 64, 128)["params"], describe(name, 64, 128)["active"]) == (counts.total, counts.active)
    assert (row["params"], row["active"]) == (82_944, 66_560)
    assert describe("dense", 64, 128)["params"] == 98_688
    # d = 2560, D = 2048: LN 5120 + router 20480 + experts 8 * 2 * 2560 * 1280 + aggregation
    # (LN 5120 + 2560 * 10240 + 10240 * 2048) + LN 4096; active: half the experts.
    assert (row["paper_params"], row["paper_active"]) == (99_649_536, 99_649_536 - 26_214_400)
    dense = describe("dense", 64, 128)
    assert (dense["experts"], dense["width"]) == (0, 512) and dense["params"] == dense["active"]


def test_setup_names_the_encoder_that_ran():
    assert report.encoder_words("tiny.en") == "OpenAI's pretrained Whisper tiny.en encoder"
    assert report.encoder_words("random-base") == "random 'random-base' Whisper encoder"
    assert report.encoder_words("ckpt/large.pt") == "Whisper encoder from ckpt/large.pt"


def test_report_end_to_end_tiny(tmp_path, tiny_experiment):
    exp = tiny_experiment(max_steps=4, checkpoints=2)
    out = tmp_path / "report"
    text = report.run_report(exp, out, num_batches=1, batch_size=3, step_size=1e-2)
    for section in ("## Tables 1-3", "## Figure 3", "## Figure 4", "## Figure 5", "## Training curves", "## The paper"):
        assert section in text, section
    assert "Model: random 'demo' Whisper encoder (frozen)" in text
    for preset in report.PRESETS:
        assert f"| {preset} |" in text, preset
    data = json.loads((out / "report.json").read_text())
    assert data["environment"]["device"].startswith("CPU") and data["experiment"]["run"]["max_steps"] == 4
    assert {"dense", "moe-8c4", "moe-8c4-no-ebl", "moe-8c4-parallel"} <= set(data["analysis"])
    assert "**moe-8c4-parallel** (rows sum to k" in text
    assert [t["step"] for t in data["analysis"]["dense"]["cosine"]] == [2, 4]
    # Tables 1-3 and the two equal-size readings of Table 1, Fig. 3, three pairs x 2 (Fig. 4), Fig. 5
    assert len(data["claims"]) == 15 + 2 + 3 + 6 + 5
    for png in ("ablation.png", "heatmap.png", "cosine.png", "influence.png", "curves.png"):
        assert (out / png).stat().st_size > 5000, png
        assert f"({png})" in text
    assert (out / "ablation.md").read_text().count("\n") == 2 + len(report.PRESETS)
    # Resumed, a finished and evaluated run is reused as it is: no training, no evaluation, the
    # same time; one trained with other settings is refused by name.
    run = tmp_path / "runs" / "dense"
    before = {f: (run / f).read_bytes() for f in ("eval.json", "log.jsonl", "train_seconds.json")}
    manifests = exp.build_corpus()
    again = train_and_evaluate(exp.with_(resume=True), "dense", manifests)
    assert {f: (run / f).read_bytes() for f in before} == before
    assert again["eval"] == json.loads(before["eval.json"]) and again["summary"]["steps"] == 4
    with pytest.raises(ValueError, match=r"trained otherwise \(lr: 0.002 -> 0.001\)"):
        train_and_evaluate(exp.with_(resume=True, lr=1e-3), "dense", manifests)


def test_ablation_cli(tmp_path, ci_corpus, capsys):
    from adapter.lalm.studies import ablation

    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_EXPERIMENT.items()]
    tiny += ["--steps=2", f"--corpus={ci_corpus}", "--quiet"]
    assert ablation.main(["--presets", "dense", "moe-8c1", "--out", str(tmp_path), *tiny]) == 0
    assert "| moe-8c1 | 8 | 1 |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["preset"] for r in rows] == ["dense", "moe-8c1"] and (tmp_path / "ablation.png").is_file()
    with pytest.raises(ValueError, match="unknown presets"):
        ablation.main(["--presets", "moe-99c1", "--out", str(tmp_path / "x"), *tiny])
