"""The main job end to end at CI size: corpus, dense and MoE training, evaluation, table, plot."""

import argparse
import json

from adapter.lalm import demo


def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "runs"
    result = demo.run_demo(
        argparse.Namespace(
            out=str(out),
            corpus=str(tmp_path / "corpus"),
            size="ci",
            train_per_task=None,
            steps=6,
            batch_size=16,
            lr=2e-3,
            audio_dim=32,
            semantic_codes=8,
            llm_hidden=64,
            llm_layers=1,
            aux_lambda=0.01,
            seed=0,
            resume=False,
            quiet=True,
            text_weight=1,
        )
    )
    report = (out / "table.txt").read_text()
    for row in (
        "MMAU-style speech",
        "MMAU-style music",
        "MMAU-style sound",
        "knowledge, text",
        "knowledge, audio",
        "modality gap",
        "balance loss",
        "expert activation rate",
    ):
        assert row in report, row
    assert (out / "demo.png").stat().st_size > 5000
    for name in ("dense", "moe-8c4"):
        ev = json.loads((out / name / "eval.json").read_text())
        assert ev["mmau"]["n"] == 11 * 3 and ev["voicebench"]["audio"]["n"] == 3
        assert 0.0 <= ev["mmau"]["overall"] <= 1.0
    assert result["results"]["moe-8c4"]["expert_rates"].keys() == {"music", "sound", "speech"}
    assert result["results"]["dense"]["expert_rates"] == {}
