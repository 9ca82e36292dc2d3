"""Audio decoding, resampling, log-mel features and the frame arithmetic of the placeholders."""

import numpy as np
import pytest
import soundfile as sf
import torch

from adapter.lalm import audio
from adapter.lalm.audio import AudioError, audio_frames, encoder_frames, load_audio, log_mel
from adapter.lalm.data import _resampled_length
from tests.adapter.lalm.conftest import REAL_RECORDING

FORMATS = [
    (44100, "wav", "PCM_16", 2),
    (8000, "flac", "PCM_24", 1),
    (22050, "wav", "FLOAT", 1),
    (16000, "ogg", "VORBIS", 1),
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
    assert len(x) == _resampled_length(path)  # headers predict the placeholder count exactly
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
