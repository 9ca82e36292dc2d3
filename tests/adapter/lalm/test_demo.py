"""The main job end to end at CI size: corpus, dense and MoE training, evaluation, table, plot."""

import json

from adapter.lalm import demo
from adapter.lalm.corpus.build import TASKS, TRAIN_ONLY


def test_demo_end_to_end_tiny(tmp_path, tiny_experiment):
    out = tmp_path / "runs"
    result = demo.run_demo(tiny_experiment(max_steps=6))
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
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    for name in demo.ADAPTERS:
        ev = json.loads((out / name / "eval.json").read_text())
        mmau_tasks = [t for t in TASKS if t != "knowledge" and t not in TRAIN_ONLY]
        assert ev["mmau"]["n"] == len(mmau_tasks) * 3 and ev["voicebench"]["audio"]["n"] == 3
        assert 0.0 <= ev["mmau"]["overall"] <= 1.0
    assert demo.ADAPTERS == ("dense", "moe-8c4-parallel")  # the README's recommended preset
    assert result["results"]["moe-8c4-parallel"]["expert_rates"].keys() == {"music", "sound", "speech"}
    assert result["results"]["dense"]["expert_rates"] == {}


def test_a_trained_run_answers_about_any_audio_file(tmp_path, tone_corpus, capsys):
    """The real float32 recording and a user's FLAC go through the same loading path as the corpus."""
    import numpy as np
    import soundfile as sf

    from adapter.lalm import evaluate
    from adapter.lalm.config import ModelConfig, TrainConfig
    from adapter.lalm.training import loop
    from tests.adapter.lalm.conftest import REAL_RECORDING

    run = tmp_path / "run"
    model = ModelConfig(encoder="demo", audio_dim=32, tiny_llm_hidden=64, tiny_llm_layers=1, adapter_backend="torch")
    loop.train(
        TrainConfig(
            train_manifest=str(tone_corpus[0]),
            output_dir=str(run),
            model=model,
            max_steps=2,
            eval_every=0,
            save_every=0,
            progress=False,
        )
    )
    flac = tmp_path / "mine.flac"
    sf.write(flac, (0.3 * np.sin(np.linspace(0, 2000, 44100))).astype(np.float32), 44100)
    assert evaluate.main(["--run", str(run), "--audio", str(REAL_RECORDING), str(flac), "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[-2:]] == ["asr_example.wav", "mine.flac"]
