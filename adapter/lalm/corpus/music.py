"""Music synthesized with numpy: notes and chords with ADSR envelopes, four timbres, scales, tempos.

Every generator returns (16 kHz float32 samples, label) and draws everything from the given RNG.
"""

from __future__ import annotations

import numpy as np

SR = 16000
TIMBRES = ("sine", "square", "sawtooth", "plucked string")
MAJOR, MINOR = (0, 4, 7), (0, 3, 7)
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11, 12)
TEMPO = {"slow": (60, 80), "normal": (100, 120), "fast": (150, 180)}  # beats per minute
# Registers of the "high or low" melodies (MIDI): C2-D3 (65-147 Hz) and D5-E6 (587-1319 Hz), two
# octaves apart so the answer never depends on a listener's idea of "middle".
REGISTERS = {"low": (36, 50), "high": (74, 88)}
NOTE_COUNTS = (2, 3, 4, 5, 6)


def midi_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def adsr(n: int, attack=0.01, decay=0.08, sustain=0.6, release=0.08) -> np.ndarray:
    a, d, r = int(attack * SR), int(decay * SR), int(release * SR)
    s = max(0, n - a - d - r)
    env = np.concatenate(
        [
            np.linspace(0, 1, a, endpoint=False),
            np.linspace(1, sustain, d, endpoint=False),
            np.full(s, sustain),
            np.linspace(sustain, 0, r),
        ]
    )
    return np.pad(env, (0, max(0, n - len(env))))[:n]


def tone(freq: float, dur: float, timbre: str, rng: np.random.Generator) -> np.ndarray:
    n = int(dur * SR)
    t = np.arange(n) / SR
    if timbre == "plucked string":  # Karplus-Strong: a noise burst averaged and decayed each period
        # The delay line plus the two-sample average sounds at SR / (period - 0.5) (measured: a
        # 1174.7 Hz target came out at SR / 12.5 before this correction) ...
        period = max(2, int(SR / freq + 0.5))
        stretch = (SR / (period - 0.5)) / freq  # >= 1: how much longer the true period is
        m = int(np.ceil(n / stretch)) + 2
        # The string starts in the triangular shape of a pluck at a fifth of its length (harmonics
        # fall as sin(k pi / 5) / k^2: the fundamental leads), plus a little noise for texture.
        pos = np.arange(period) / period
        apex = rng.uniform(0.15, 0.25)
        buf = np.where(pos < apex, pos / apex, (1 - pos) / (1 - apex)) + 0.1 * rng.uniform(-1, 1, period)
        buf -= buf.mean()  # no DC offset
        periods = []
        for _ in range(-(-m // period)):
            periods.append(buf)
            buf = 0.996 * 0.5 * (buf + np.roll(buf, -1))
        raw = np.concatenate(periods)[:m]
        # ... so read it `stretch` times slower (linear interpolation): exactly `freq`, not up to half
        # a semitone sharp as the integer period alone would be.
        out = np.interp(np.arange(n) / stretch, np.arange(m), raw)
        out /= max(1e-9, np.sqrt(np.mean(out**2)) * 2**0.5)  # RMS of a unit sine: notes equally loud
        return out * adsr(n, 0.002, 0.05, 0.8, 0.05)
    if timbre == "sine":
        wave = np.sin(2 * np.pi * freq * t)
    else:  # band-limited additive synthesis below Nyquist: square = odd harmonics 1/k, saw = all 1/k
        ks = np.arange(1, int((SR / 2) // freq) + 1)
        if timbre == "square":
            ks = ks[ks % 2 == 1]
        elif timbre != "sawtooth":
            raise ValueError(f"unknown timbre {timbre!r}")
        wave = (np.sin(2 * np.pi * freq * np.outer(ks, t)) / ks[:, None]).sum(0)
    return wave * adsr(n)


def _normalize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = x - x.mean()
    x = x / max(1e-9, np.abs(x).max())
    return (rng.uniform(0.3, 0.8) * x + rng.normal(0, 0.002, len(x))).astype(np.float32)


def sequence(notes, durations, timbre, rng, gap: float = 0.0) -> np.ndarray:
    parts = []
    for note, dur in zip(notes, durations, strict=True):
        parts.append(tone(midi_hz(note), dur, timbre, rng))
        if gap:
            parts.append(np.zeros(int(gap * SR)))
    return np.concatenate(parts)


def chord_mode(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A major or minor triad, as a block chord or an arpeggio."""
    mode = rng.choice(["major", "minor"])
    root = int(rng.integers(52, 68))
    timbre = str(rng.choice(TIMBRES))
    notes = [root + i for i in (MAJOR if mode == "major" else MINOR)]
    if rng.random() < 0.5:
        x = sum(tone(midi_hz(n), 1.2, timbre, rng) for n in notes)
    else:
        x = sequence(notes + [notes[0] + 12], [0.3] * 4, timbre, rng)
    return _normalize(x, rng), str(mode)


def instrument(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    timbre = str(rng.choice(TIMBRES))
    notes = [int(rng.integers(55, 72)) for _ in range(int(rng.integers(2, 5)))]
    return _normalize(sequence(notes, [0.35] * len(notes), timbre, rng), rng), timbre


def direction(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    way = str(rng.choice(["ascending", "descending"]))
    root = int(rng.integers(50, 66))
    steps = list(MAJOR_SCALE[: int(rng.integers(5, 9))])
    notes = [root + s for s in (steps if way == "ascending" else steps[::-1])]
    return _normalize(sequence(notes, [0.22] * len(notes), str(rng.choice(TIMBRES)), rng), rng), way


def note_count(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    count = int(rng.choice(NOTE_COUNTS))
    notes = [int(rng.integers(55, 76)) for _ in range(count)]
    x = sequence(notes, [0.25] * count, str(rng.choice(TIMBRES)), rng, gap=0.15)
    return _normalize(x, rng), str(count)


def tempo(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    cls = str(rng.choice(list(TEMPO)))
    bpm = rng.uniform(*TEMPO[cls])
    beat = 60.0 / bpm
    notes = [int(rng.integers(57, 74)) for _ in range(8)]
    x = sequence(notes, [0.6 * beat] * 8, str(rng.choice(TIMBRES)), rng, gap=0.4 * beat)
    return _normalize(x, rng), cls


def register(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A short melody in the low or the high register (the "high or low" question music shares
    with speech and sound)."""
    cls = str(rng.choice(list(REGISTERS)))
    lo, hi = REGISTERS[cls]
    notes = [int(rng.integers(lo, hi + 1)) for _ in range(int(rng.integers(3, 6)))]
    return _normalize(sequence(notes, [0.3] * len(notes), str(rng.choice(TIMBRES)), rng), rng), cls
