"""Small random versions of the transformers audio LLMs the swap API knows (no downloads), and a
batch builder for them: what the tests and examples/swap_hf_model.py run a forward and a training
step on. Real checkpoints load with `from_pretrained(local_dir)` and swap the same way.

Each builder returns (model, audio_token_id, tokens_per_clip) for mel inputs of `MEL_FRAMES` frames.
"""

from __future__ import annotations

import torch

MEL_BINS = 16
MEL_FRAMES = 40  # 2 x max_source_positions: the Whisper-style encoders want exactly this many frames
AUDIO_TOKEN = 100


def _text(model_type: str) -> dict:
    return dict(
        model_type=model_type,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )


def _encoder(model_type: str, **dims) -> dict:
    return dict(model_type=model_type, num_mel_bins=MEL_BINS, max_source_positions=MEL_FRAMES // 2, **dims)


def qwen2_audio():
    import transformers as tf

    cfg = tf.Qwen2AudioConfig(
        audio_config=_encoder(
            "qwen2_audio_encoder", d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32
        ),
        text_config=_text("qwen2"),
        audio_token_index=AUDIO_TOKEN,
    )
    return tf.Qwen2AudioForConditionalGeneration(cfg), 10  # conv stride 2, then average pooling by 2


def voxtral():
    import transformers as tf

    cfg = tf.VoxtralConfig(
        audio_config=_encoder(
            "voxtral_encoder", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        text_config=_text("llama"),
        audio_token_id=AUDIO_TOKEN,
    )
    return tf.VoxtralForConditionalGeneration(cfg), 5  # conv stride 2, then 4 frames per token


def audio_flamingo3():
    import transformers as tf

    cfg = tf.AudioFlamingo3Config(
        audio_config=_encoder(
            "audioflamingo3_encoder", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        text_config=_text("qwen2"),
        audio_token_id=AUDIO_TOKEN,
    )
    return tf.AudioFlamingo3ForConditionalGeneration(cfg), 10


BUILDERS = {"qwen2-audio": qwen2_audio, "voxtral": voxtral, "audio-flamingo-3": audio_flamingo3}


def make_batch(name: str, tokens_per_clip: int, batch: int = 2, text: int = 6, seed: int = 0) -> dict:
    """Random mels and a prompt [text, audio placeholders, text] per clip, labels on the text after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, AUDIO_TOKEN, (batch, 2 * text + tokens_per_clip), generator=g)
    ids[:, text : text + tokens_per_clip] = AUDIO_TOKEN
    labels = ids.clone()
    labels[:, : text + tokens_per_clip] = -100
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": torch.randn(batch, MEL_BINS, MEL_FRAMES, generator=g),
        "labels": labels,
    }
    mel_mask = torch.ones(batch, MEL_FRAMES, dtype=torch.long)
    if name == "qwen2-audio":
        out["feature_attention_mask"] = mel_mask
    elif name == "audio-flamingo-3":
        out["input_features_mask"] = mel_mask
    return out
