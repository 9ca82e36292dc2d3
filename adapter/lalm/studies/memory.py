"""Per-GPU memory of the reference LALM's training state, DDP against FSDP: `python -m adapter.lalm.studies.memory`.

Computed, not measured: parameter counts come from the real architectures built on the meta device
(Qwen3 through transformers, Whisper large-v3's encoder, the adapter preset and the fusion layer at
the paper's d = 2560; nothing is downloaded and no memory is allocated), then bytes per parameter:

  DDP (every GPU holds everything; bf16 autocast on fp32 weights; --fp16 takes the same bytes)
    trained   4 (fp32 weight) + 4 (fp32 grad) + 8 (AdamW exp_avg, exp_avg_sq) = 16 B
    frozen    4 B
    transient 2 B per weight the forward casts to bf16 (autocast keeps the casts for the forward)
  FSDP over N GPUs (MixedPrecisionPolicy bf16 params, fp32 reduce; adapter/lalm/training/parallel.py)
    trained   16 / N B;  frozen parts inside the sharded units 4 / N B
    frozen encoder (ignored_params) 4 B, replicated: it only computes the cached features
    transient the root unit gathered in bf16 for the whole step (embeddings, LM head, norms, fusion),
              plus two decoder layers or the adapter (the one running and the one prefetched) in
              bf16 and one unit's unsharded fp32 gradients before its reduce-scatter

Activations, the CUDA context, allocator fragmentation and communication buffers are not counted:
the table says how much of an 80 GiB GPU the model state leaves for them. Qwen3 shapes are those of
the models' config.json (vocabulary 151936, head_dim 128).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from adapter.cli import run_cli

GIB = 1024**3
PAPER_AUDIO_DIM = 2560
WHISPER_LARGE_V3_CHANNELS = 1280  # encoder width C; the fusion layer reads 4 stacked frames (4C)

QWEN3 = {
    # name: (hidden, intermediate, layers, attention heads, KV heads, tied embeddings)
    "Qwen3-1.7B": (2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": (2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": (4096, 12288, 36, 32, 8, False),
}


def qwen3_config(name: str):
    from transformers import Qwen3Config

    hidden, inter, layers, heads, kv, tied = QWEN3[name]
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        tie_word_embeddings=tied,
    )


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts a tied weight once


@dataclass(frozen=True)
class Counts:
    """Parameters of one LALM, by FSDP unit: the LLM's root (embeddings, head, final norm), its
    largest decoder layer and all of them, the adapter, the fusion layer and the frozen encoder."""

    llm_root: int
    llm_layer: int
    llm_layers: int
    adapter: int
    fusion: int
    encoder: int

    @property
    def llm(self) -> int:
        return self.llm_root + self.llm_layers


def count_llm(config) -> tuple[int, int, int]:
    """(root, largest decoder layer, all decoder layers) of a transformers causal LM config, built
    on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    layers = [_numel(layer) for layer in llm.get_decoder().layers]
    return _numel(llm) - sum(layers), max(layers), sum(layers)


def count_lalm(llm: str, adapter: str = "moe-8c4-parallel", encoder: str = "random-large-v3") -> Counts:
    from adapter.lalm.encoder import build_encoder
    from adapter.lalm.model import FeatureFusion
    from adapter.presets import build_adapter, preset

    root, layer, layers = count_llm(qwen3_config(llm))
    hidden = QWEN3[llm][0]
    with torch.device("meta"):
        enc = build_encoder(encoder)
        stacked = enc.stacked_dim
        fusion = FeatureFusion(stacked, PAPER_AUDIO_DIM)
        adp = build_adapter(preset(adapter, PAPER_AUDIO_DIM, hidden))
    return Counts(root, layer, layers, _numel(adp), _numel(fusion), _numel(enc))


def per_gpu_bytes(c: Counts, mode: str, gpus: int, train_llm: bool) -> dict[str, float]:
    """{'state': weights + grads + AdamW held between steps, 'transient': what a step adds
    (bf16 copies, unsharded gradients)} in bytes on one GPU; see the module docstring."""
    if mode not in ("ddp", "fsdp") or gpus < 1:
        raise ValueError(f"mode must be 'ddp' or 'fsdp' and gpus >= 1, got {mode!r}, {gpus}")
    trained = c.adapter + c.fusion + (c.llm if train_llm else 0)
    frozen_sharded = 0 if train_llm else c.llm
    if mode == "ddp":
        state = 16 * trained + 4 * (frozen_sharded + c.encoder)
        transient = 2 * (c.llm + c.adapter + c.fusion)
    else:
        state = (16 * trained + 4 * frozen_sharded) / gpus + 4 * c.encoder
        biggest_unit = max(c.llm_layer, c.adapter)
        transient = 2 * (c.llm_root + c.fusion) + 2 * 2 * biggest_unit + (4 * biggest_unit if trained else 0)
        if train_llm:
            transient += 4 * (c.llm_root + c.fusion)  # the root's fp32 gradients, unsharded until its reduce
    return {"state": state, "transient": transient}


def table(llms=tuple(QWEN3), gpus: int = 8, adapter: str = "moe-8c4-parallel", gpu_gib: float = 80.0) -> str:
    rows = [
        "| LLM | trains | params (LLM / adapter / encoder) | mode | state GiB | + step GiB "
        f"| left of {gpu_gib:g} GiB |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name in llms:
        c = count_lalm(name, adapter)
        sizes = f"{c.llm / 1e9:.2f}B / {c.adapter / 1e6:.1f}M / {c.encoder / 1e6:.0f}M"
        for train_llm in (True, False):
            for mode in ("ddp", "fsdp"):
                b = per_gpu_bytes(c, mode, gpus, train_llm)
                left = gpu_gib - (b["state"] + b["transient"]) / GIB
                rows.append(
                    f"| {name} | {'LLM + adapter' if train_llm else 'adapter'} | {sizes} | "
                    f"{'DDP' if mode == 'ddp' else f'FSDP x{gpus}'} | {b['state'] / GIB:.1f} | "
                    f"{b['transient'] / GIB:.1f} | {left:.1f} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", nargs="+", default=list(QWEN3), choices=list(QWEN3), help="Qwen3 sizes to tabulate")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs FSDP shards over (default: 8)")
    p.add_argument("--adapter", default="moe-8c4-parallel", help="adapter preset at d = 2560 (default: the paper's)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory in GiB for the last column (default: 80)")
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error(f"--gpus must be >= 1, got {args.gpus}")
    print(table(args.llm, args.gpus, args.adapter, args.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
