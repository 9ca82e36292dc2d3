"""The Whisper encoder at true length, 30 s chunking, stacking, and loading checkpoint files."""

import dataclasses

import pytest
import torch
from whisper.model import ModelDimensions, Whisper

from adapter.lalm.audio import encoder_frames
from adapter.lalm.encoder import ENCODER_PRESETS, EncoderDims, WhisperEncoder, build_encoder
from tests.utils import assert_close


class NotAWeight:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse to build it."""


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return WhisperEncoder(ENCODER_PRESETS["demo"]).eval()


def test_matches_whisper_forward_on_exactly_30s(enc):
    mel = torch.randn(80, 3000)
    with torch.no_grad():
        ours = enc.encode(mel)
        theirs = enc.encoder(mel[None])[0]
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5, name="30 s")


@pytest.mark.parametrize("mel_frames", [40, 199, 1000, 3100, 6000])
def test_any_length_no_padding_to_30s(enc, mel_frames):
    with torch.no_grad():
        out = enc.encode(torch.randn(80, mel_frames))
    assert out.shape == (encoder_frames(mel_frames), 64)
    stacked = enc.stack(out)
    assert stacked.shape == (-(-out.shape[0] // 4), 256)
    assert torch.equal(stacked.reshape(-1, 64)[: out.shape[0]], out)  # frames in order
    assert (stacked.reshape(-1, 64)[out.shape[0] :] == 0).all()  # zero-padded last group


def test_chunks_are_encoded_independently(enc):
    mel = torch.randn(80, 3100)
    with torch.no_grad():
        whole = enc.encode(mel)
        first = enc.encode(mel[:, :3000])
        tail = enc.encode(mel[:, 3000:])
    assert torch.equal(whole, torch.cat([first, tail]))


def test_loads_an_openai_whisper_checkpoint_file(tmp_path):
    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=100,
        n_text_ctx=16,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=1,
    )
    torch.manual_seed(1)
    whisper = Whisper(dims)
    path = tmp_path / "whisper-small-test.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": whisper.state_dict()}, path)
    loaded = build_encoder(str(path))
    assert loaded.dims == EncoderDims(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2)
    mel = torch.randn(80, 3000)
    with torch.no_grad():
        assert torch.equal(loaded.encode(mel), whisper.encoder(mel[None])[0])


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        WhisperEncoder.from_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Whisper checkpoint"):
        WhisperEncoder.from_checkpoint(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "payload": NotAWeight()}, pickled)
    with pytest.raises(ValueError, match="cannot read"):  # weights_only refuses arbitrary objects
        WhisperEncoder.from_checkpoint(pickled)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an openai-whisper checkpoint"):
        WhisperEncoder.from_checkpoint(other)
    with pytest.raises(ValueError, match="n_mels must be 80 or 128"):
        EncoderDims(n_mels=64)
    with pytest.raises(ValueError, match="expected a log-mel of shape"):
        WhisperEncoder(ENCODER_PRESETS["demo"]).encode(torch.randn(128, 100))
