"""The README's usage example: an MoE adapter as the projector between an audio encoder and an LLM."""

import torch

from adapter import MoEAdapter, preset, total_aux_loss

adapter = MoEAdapter(preset("moe-8c4-parallel", in_dim=256, out_dim=192))  # Table 4 shape, scaled down
audio_feats = torch.randn(2, 50, 256)  # (batch, frames, d) from the audio frontend
mask = torch.ones(2, 50, dtype=torch.bool)
mask[1, 30:] = False  # padded frames get no expert work and zero output
llm_embeds = adapter(audio_feats, mask)  # (2, 50, 192): goes where the audio placeholders were
loss = llm_embeds.pow(2).mean() + 0.01 * total_aux_loss(adapter)  # task loss + lambda * balance loss
loss.backward()
print(llm_embeds.shape, f"aux={adapter.aux_loss.item():.3f}", "tokens/expert:", adapter.expert_counts.tolist())
print(adapter.param_counts())
