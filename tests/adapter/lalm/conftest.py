"""A small two-class tone corpus written in several formats and sample rates."""

import json

import numpy as np
import pytest
import soundfile as sf

REAL_RECORDING = __import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "asr_example.wav"


def write_tone_corpus(root, n: int, seed: int = 0) -> tuple:
    """n clips of a low (150-300 Hz) or high (900-1500 Hz) tone, 0.5-1.5 s, at 8 / 16 / 22.05 kHz, as
    PCM16 WAV, float WAV or FLAC; 80% train, 20% val manifests. Returns (train, val) paths."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    formats = [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_16")]
    recs = []
    for i in range(n):
        high = i % 2
        freq = rng.uniform(900, 1500) if high else rng.uniform(150, 300)
        sr = (16000, 22050, 8000)[i % 3]
        ext, subtype = formats[(i // 3) % 3]
        t = np.arange(int(rng.uniform(0.5, 1.5) * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(root / f"c{i}.{ext}", x.astype(np.float32), sr, subtype=subtype)
        recs.append(
            {
                "id": f"c{i}",
                "audio": f"c{i}.{ext}",
                "question": "Is the tone high or low?",
                "answer": "high" if high else "low",
                "category": "sound",
                "task": "pitch",
            }
        )
    cut = int(0.8 * n)
    for name, part in (("train.jsonl", recs[:cut]), ("val.jsonl", recs[cut:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return root / "train.jsonl", root / "val.jsonl"


@pytest.fixture(scope="session")
def tone_corpus(tmp_path_factory):
    return write_tone_corpus(tmp_path_factory.mktemp("tones"), 40)


@pytest.fixture(scope="session")
def mixed_corpus(tone_corpus, tmp_path_factory):
    """The tone clips plus 24 text-only questions: length batching puts the short text examples
    together, so some micro-batches carry no audio at all."""
    text = tmp_path_factory.mktemp("text") / "text.jsonl"
    rows = [{"id": f"t{i}", "question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(24)]
    text.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"{tone_corpus[0]},{text}", str(tone_corpus[1])


@pytest.fixture(scope="session")
def ci_corpus(tmp_path_factory):
    """The generated corpus at CI size, built once per session (the demo and report tests share it)."""
    from adapter.lalm.corpus import SIZES, build_corpus

    root = tmp_path_factory.mktemp("corpus-ci")
    build_corpus(root, SIZES["ci"], progress=False)
    return root


TINY_EXPERIMENT = dict(
    encoder="demo",
    size="ci",
    max_batch_size=16,
    audio_dim=32,
    semantic_codes=8,
    tiny_llm_hidden=64,
    tiny_llm_layers=1,
    text_weight=1,
)
"""The smallest experiment the demo, ablation and report tests train with (seconds each): ExperimentConfig's
own fields and its run's TrainConfig / ModelConfig fields, by name (ExperimentConfig.of)."""


def tiny_experiment_argv(**extra) -> list[str]:
    """TINY_EXPERIMENT, and `extra` fields, as an experiment runner's command-line flags."""
    argv = []
    for k, v in {**TINY_EXPERIMENT, **extra}.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


@pytest.fixture
def tiny_experiment(tmp_path, ci_corpus):
    """ExperimentConfig.of(**TINY_EXPERIMENT) on the session corpus, writing under tmp_path/runs."""
    from adapter.lalm.studies.experiment import ExperimentConfig

    return lambda **kw: ExperimentConfig.of(
        **{**TINY_EXPERIMENT, "out": str(tmp_path / "runs"), "corpus": str(ci_corpus), "quiet": True, **kw}
    )
