"""Audio decoding, resampling, log-mel features and the frame arithmetic of the placeholders."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from adapter.lalm import audio
from adapter.lalm.audio import AudioError, audio_frames, encoder_frames, load_audio, log_mel
from adapter.lalm.data import resampled_length
from tests.adapter.lalm.conftest import REAL_RECORDING

FORMATS = [
    (44100, "wav", "PCM_16", 2),
    (8000, "flac", "PCM_24", 1),
    (22050, "wav", "FLOAT", 1),
    (16000, "ogg", "VORBIS", 1),
    (44100, "mp3", "MPEG_LAYER_III", 2),  # Common Voice's format (libsndfile >= 1.1 decodes MP3)
    (48000, "ogg", "OPUS", 1),
]


@pytest.mark.parametrize("sr,ext,subtype,channels", FORMATS)
def test_formats_and_rates_load_as_16k_mono(tmp_path, sr, ext, subtype, channels):
    t = np.arange(int(0.8 * sr)) / sr
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    data = np.stack([tone] * channels, 1) if channels > 1 else tone
    path = tmp_path / f"x.{ext}"
    sf.write(path, data.astype(np.float32), sr, subtype=subtype)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 0.8 * 16000) <= 1
    assert len(x) == resampled_length(path)  # headers predict the placeholder count exactly
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - 1000) < 5  # the tone survives resampling


def test_real_float32_recording_loads():
    x = load_audio(REAL_RECORDING)
    assert x.dtype == np.float32 and 10.0 < len(x) / 16000 < 11.0 and 0.1 < np.abs(x).max() <= 1.0
    mel = log_mel(x, 128)
    assert mel.shape == (128, len(x) // 160) and torch.isfinite(mel).all()


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(range(200)))
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav.*no samples"):
        load_audio(empty)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="short.wav is 100 samples"):
        load_audio(short)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan] * 400, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        load_audio(nan)


def test_frame_arithmetic():
    assert encoder_frames(100) == 50 and encoder_frames(101) == 51
    assert encoder_frames(3000) == 1500 and encoder_frames(3100) == 1550  # a second 30 s chunk
    assert audio_frames(16000) == 13  # 1 s: 100 mel -> 50 encoder -> ceil(50 / 4)
    assert audio_frames(30 * 16000) == 375
    assert audio.STACK == 4 and audio.SAMPLE_RATE == 16000


def test_huge_float_samples_are_refused_with_file_and_manifest_line(tmp_path):
    """Finite but absurd samples (1e30) would overflow the log-mel power to inf and give NaN
    features and skipped steps; they are refused, naming the file and the manifest line."""
    from adapter.lalm.data import FeatureSource, read_manifest

    huge = tmp_path / "huge.wav"
    sf.write(huge, np.full(1600, 1e30, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"huge.wav peaks at 1e\+30"):
        load_audio(huge)
    ok = tmp_path / "ok.wav"
    sf.write(ok, 0.9 * np.sin(np.arange(1600) / 5).astype(np.float32), 16000, subtype="FLOAT")
    assert load_audio(ok).shape == (1600,)  # ordinary full-scale audio passes
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "audio": "ok.wav", "question": "q"}, {"id": "b", "audio": "huge.wav", "question": "q"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = read_manifest(manifest)[1]
    with pytest.raises(AudioError, match=r"m.jsonl:2: .*huge.wav peaks"):
        FeatureSource(80).mel(ex)
    # A manifest naming a file that is not there, or is not audio: the line and the file, plainly.
    rows[1]["audio"] = "gone.wav"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match=r"m.jsonl:2: audio file not found: .*gone.wav$"):
        read_manifest(manifest)
    with pytest.raises(FileNotFoundError, match=r"^audio file not found: .*gone.wav$"):
        resampled_length(tmp_path / "gone.wav")  # a path given on the command line (evaluate --audio)
    (tmp_path / "text.wav").write_text("not audio")
    rows[1]["audio"] = "text.wav"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AudioError, match=r"m.jsonl:2: cannot read audio header of .*text.wav: .*not recogni"):
        read_manifest(manifest)
