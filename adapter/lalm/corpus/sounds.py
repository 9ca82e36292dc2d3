"""Environmental sounds synthesized with numpy: rain, wind, siren, alarm, knocking, engine hum.

Every generator returns (16 kHz float32 samples, label) and draws everything from the given RNG.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfilt

SR = 16000
SOUNDS = ("rain", "wind", "siren", "alarm", "knocking", "engine")
KNOCK_COUNTS = (1, 2, 3, 4, 5)
KNOCK_GAP = (0.35, 0.6)  # seconds between knocks of the count and which-sound tasks
# The "slow, normal or fast" knocking of the pace task (seconds between knocks), the same answer
# words speech rate and music tempo use.
KNOCK_PACE = {"slow": (0.8, 1.0), "normal": (0.4, 0.55), "fast": (0.14, 0.2)}
# The "high or low" beeping of the pitch task (Hz): two octaves and more apart.
BEEP_PITCH = {"low": (150.0, 350.0), "high": (1500.0, 3000.0)}


def _filtered_noise(n: int, rng, kind: str, cutoff) -> np.ndarray:
    sos = butter(4, cutoff, btype=kind, fs=SR, output="sos")
    return sosfilt(sos, rng.normal(0, 1, n))


def _finish(x: np.ndarray, rng) -> np.ndarray:
    x = x / max(1e-9, np.abs(x).max())
    return (rng.uniform(0.3, 0.8) * x).astype(np.float32)


def rain(rng, dur: float) -> np.ndarray:
    n = int(dur * SR)
    x = 0.3 * _filtered_noise(n, rng, "highpass", 2000)
    for _ in range(int(dur * rng.uniform(40, 90))):  # droplets: short decaying noise bursts
        start, length = int(rng.integers(0, n - 400)), int(rng.integers(80, 400))
        x[start : start + length] += rng.normal(0, 1, length) * np.exp(-np.arange(length) / (length / 5))
    return x


def wind(rng, dur: float) -> np.ndarray:
    n = int(dur * SR)
    gust = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * np.arange(n) / SR + rng.uniform(0, 6.3))
    return _filtered_noise(n, rng, "lowpass", rng.uniform(300, 700)) * gust


def siren(rng, dur: float) -> np.ndarray:
    t = np.arange(int(dur * SR)) / SR
    lo, hi, rate = rng.uniform(550, 750), rng.uniform(1100, 1500), rng.uniform(0.3, 0.8)
    freq = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * rate * t))  # a wail sweeping lo -> hi -> lo
    return np.sin(2 * np.pi * np.cumsum(freq) / SR)


def alarm(rng, dur: float) -> np.ndarray:
    t = np.arange(int(dur * SR)) / SR
    on = (np.floor(t / rng.uniform(0.15, 0.3)) % 2) == 0  # beep, pause, beep ...
    return np.sign(np.sin(2 * np.pi * rng.uniform(2000, 3000) * t)) * on * 0.5


def knocks(rng, count: int, gap: tuple[float, float] = KNOCK_GAP) -> np.ndarray:
    gaps = rng.uniform(*gap, count)
    n = int((0.3 + gaps.sum() + 0.3) * SR)
    x = np.zeros(n)
    pos = 0.3
    for g in gaps:  # each knock: a low-passed click decaying over ~40 ms
        start = int(pos * SR)
        k = np.arange(int(0.08 * SR))
        x[start : start + len(k)] += np.sin(2 * np.pi * rng.uniform(120, 250) * k / SR) * np.exp(-k / (0.012 * SR))
        pos += g
    return x + rng.normal(0, 0.003, n)


def engine(rng, dur: float) -> np.ndarray:
    t = np.arange(int(dur * SR)) / SR
    f0 = rng.uniform(30, 60)
    hum = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k for k in range(1, 8))
    return hum * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(4, 9) * t)) + 0.2 * _filtered_noise(
        len(t), rng, "lowpass", 400
    )


def which_sound(rng) -> tuple[np.ndarray, str]:
    label = str(rng.choice(SOUNDS))
    if label == "knocking":
        x = knocks(rng, int(rng.choice(KNOCK_COUNTS)))
    else:
        x = {"rain": rain, "wind": wind, "siren": siren, "alarm": alarm, "engine": engine}[label](
            rng, rng.uniform(1.2, 2.5)
        )
    return _finish(x, rng), label


def knock_count(rng) -> tuple[np.ndarray, str]:
    count = int(rng.choice(KNOCK_COUNTS))
    return _finish(knocks(rng, count), rng), str(count)


def knock_pace(rng) -> tuple[np.ndarray, str]:
    """Three to five knocks, slow, normal or fast."""
    pace = str(rng.choice(list(KNOCK_PACE)))
    return _finish(knocks(rng, int(rng.integers(3, 6)), KNOCK_PACE[pace]), rng), pace


def beep_pitch(rng) -> tuple[np.ndarray, str]:
    """A beeping tone, low or high: a sine with a few harmonics, on and off at a random rhythm."""
    cls = str(rng.choice(list(BEEP_PITCH)))
    f0 = rng.uniform(*BEEP_PITCH[cls])
    t = np.arange(int(rng.uniform(1.2, 2.2) * SR)) / SR
    on = (np.floor(t / rng.uniform(0.12, 0.35)) % 2) == 0
    tone = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k**2 for k in (1, 2, 3))
    return _finish(tone * on + rng.normal(0, 0.01, len(t)), rng), cls


def mix_under(speech: np.ndarray, background: np.ndarray, rng, snr_db: tuple = (0.0, 10.0)) -> np.ndarray:
    """Speech over a background sound looped or cut to the speech's length, at a random SNR."""
    reps = -(-len(speech) // len(background))
    bg = np.tile(background, reps)[: len(speech)]
    snr = rng.uniform(*snr_db)
    p_s, p_b = np.mean(speech**2) + 1e-12, np.mean(bg**2) + 1e-12
    mix = speech + bg * np.sqrt(p_s / (p_b * 10 ** (snr / 10)))
    return (0.9 * mix / max(1e-9, np.abs(mix).max())).astype(np.float32)
