"""Audio in: decode any WAV, FLAC, OGG (Vorbis, Opus) or MP3 file with libsndfile, mix to mono,
resample to 16 kHz, and compute Whisper's log-mel features.

Frame arithmetic (what the placeholder count of a clip is, before any model runs):
  mel frames      = samples // 160                    (Whisper: 10 ms hop, last STFT frame dropped)
  encoder frames  = per 30 s chunk (3000 mel frames), ceil(chunk / 2)   (50 Hz)
  audio frames    = ceil(encoder frames / 4)          (4 stacked: 12.5 Hz, the adapter's tokens)
"""

from __future__ import annotations

import math
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
import torch

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # Whisper's STFT hop: 100 mel frames per second
CHUNK_MEL_FRAMES = 3000  # 30 s: the Whisper encoder's positional-embedding length (1500) x 2
STACK = 4  # encoder frames per adapter token: 50 Hz -> 12.5 Hz
MIN_SAMPLES = 400  # one STFT window (25 ms); shorter clips have no mel frame
# Float audio's full scale is +-1. A file peaking 60 dB above it is not a recording (a bad
# conversion, raw counts stored as floats): at 1e30 the log-mel power overflows float32 to inf and
# every feature of the clip turns NaN, so such files are refused instead.
MAX_PEAK = 1e3


class AudioError(ValueError):
    """An audio file that cannot be used: unreadable, not audio, empty, too short, or non-finite."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono samples at `sample_rate`. Raises FileNotFoundError or AudioError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors name the format problem; add the file
        raise AudioError(f"cannot decode audio file {path}: {exc}") from exc
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(f"audio file {path} holds NaN or infinite samples")
    peak = float(np.abs(mono).max())
    if peak > MAX_PEAK:
        raise AudioError(
            f"audio file {path} peaks at {peak:.3g}, over {MAX_PEAK:g} times full scale (+-1): not usable audio"
        )
    if sr != sample_rate:
        mono = resample(mono, sr, sample_rate)
    if mono.shape[0] < MIN_SAMPLES:
        raise AudioError(f"audio file {path} is {mono.shape[0]} samples long; at least {MIN_SAMPLES} are needed")
    return np.ascontiguousarray(mono, dtype=np.float32)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling with scipy's anti-aliasing FIR filter."""
    # Imported here: scipy.signal took 1.75 s of importing adapter.lalm.train (-X importtime, 2-core
    # Xeon, 2026-12-03), and every training process imports this module while few ever resample.
    from scipy.signal import resample_poly

    g = gcd(int(orig_sr), int(target_sr))
    return resample_poly(samples, target_sr // g, orig_sr // g).astype(np.float32)


def log_mel(samples: np.ndarray | torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel spectrogram (n_mels, samples // 160) of 16 kHz audio."""
    import whisper

    if not torch.is_tensor(samples):
        samples = torch.from_numpy(np.asarray(samples, dtype=np.float32))
    if samples.shape[-1] < MIN_SAMPLES:
        raise AudioError(f"{samples.shape[-1]} samples: at least {MIN_SAMPLES} are needed for one mel frame")
    return whisper.log_mel_spectrogram(samples, n_mels=n_mels)


def encoder_frames(mel_frames: int) -> int:
    """Whisper encoder frames (50 Hz) for a clip of `mel_frames`, encoded in 30 s chunks."""
    full, rest = divmod(mel_frames, CHUNK_MEL_FRAMES)
    return full * (CHUNK_MEL_FRAMES // 2) + math.ceil(rest / 2)


def audio_frames(num_samples: int) -> int:
    """Adapter tokens (12.5 Hz) for a clip of `num_samples` at 16 kHz: the placeholder count."""
    return math.ceil(encoder_frames(num_samples // HOP_LENGTH) / STACK)
