"""Build the reference LALM from a ModelConfig: tokenizer, LLM, Whisper encoder, adapter, frontend.

Everything random is drawn from `seed`, so a frozen part rebuilt from its config is bit-identical
to the one a run trained with; checkpoints therefore store only what trains (and the fitted
semantic codebook).
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapter.lalm.config import ModelConfig
from adapter.lalm.encoder import build_encoder
from adapter.lalm.model import AUDIO_CATEGORIES, AudioLLM, FrontendConfig
from adapter.lalm.tokenizer import load_tokenizer
from adapter.presets import build_adapter, is_dense, preset


def tiny_qwen3(vocab_size: int, hidden: int = 128, layers: int = 2, seed: int = 0):
    """A small random Qwen3 causal LM (4 query heads, 2 KV heads, tied embeddings)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=-(-vocab_size // 64) * 64,  # a multiple of 64, as real vocabularies are padded
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(cfg)


def load_llm(spec: str, vocab_size: int, config: ModelConfig, seed: int = 0):
    """'tiny' or a local transformers directory (never a hub download); embeddings grown to the
    tokenizer's vocabulary when it added tokens."""
    if spec == "tiny":
        return tiny_qwen3(vocab_size, config.tiny_llm_hidden, config.tiny_llm_layers, seed)
    from transformers import AutoModelForCausalLM

    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"LLM directory not found: {path} (give a local path; nothing is downloaded)")
    llm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    if llm.get_input_embeddings().num_embeddings < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm


def build_model(config: ModelConfig, seed: int = 0) -> AudioLLM:
    tokenizer = load_tokenizer(config.tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = load_llm(config.llm, tokenizer.vocab_size, config, seed)
        encoder = build_encoder(config.encoder)
        hidden = llm.get_input_embeddings().embedding_dim
        overrides = (
            {}
            if is_dense(config.adapter)
            else {
                "backend": config.adapter_backend,
                "expert_init": config.expert_init,
                "balance_scope": config.balance_scope,
                "routing": config.routing,
                "num_labels": len(AUDIO_CATEGORIES) if config.routing == "label" else 0,
                **({"num_experts": config.num_experts} if config.num_experts else {}),
                **({"top_k": config.top_k} if config.top_k else {}),
            }
        )
        adapter_config = preset(config.adapter, config.audio_dim, hidden, width_scale=config.adapter_width, **overrides)
        adapter = build_adapter(adapter_config)
        frontend = FrontendConfig(
            audio_dim=config.audio_dim, semantic_codes=config.semantic_codes, use_continuous=config.use_continuous
        )
        return AudioLLM(encoder, adapter, llm, tokenizer, frontend)
