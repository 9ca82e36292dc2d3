"""The reference audio LLM: Whisper encoder -> 4-frame stacking -> dual-stream fusion -> adapter
-> a transformers causal LM whose `<|audio_pad|>` placeholder embeddings are replaced by the
adapter's outputs (paper Fig. 2b, Table 4 I).

    continuous  LN -> Linear(4C -> d) -> SiLU -> LN        of the stacked encoder features
    discrete    Embedding(codes, d) of the frozen k-means semantic tokens of the same frames
    x = continuous + discrete (either may be switched off);  y = adapter(x, mask)  (d -> D)

Shape legend: B batch, L text positions, F audio frames (12.5 Hz), C encoder width, d adapter
input width, D the LLM's hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from adapter.lalm.encoder import WhisperEncoder
from adapter.lalm.semantic import SemanticTokenizer
from adapter.stats import total_aux_loss

IGNORE = -100  # label of positions that carry no loss (prompt, audio, padding)


@dataclass(kw_only=True)
class FrontendConfig:
    """audio_dim d (2560 in the paper); semantic_codes: k-means codebook size (0 turns the discrete
    stream off); use_continuous: the fused encoder features (off: discrete stream only)."""

    audio_dim: int
    semantic_codes: int = 0
    use_continuous: bool = True

    def __post_init__(self) -> None:
        if self.audio_dim <= 0 or self.semantic_codes < 0:
            raise ValueError(
                f"audio_dim must be > 0 and semantic_codes >= 0, got {self.audio_dim}, {self.semantic_codes}"
            )
        if not self.use_continuous and not self.semantic_codes:
            raise ValueError("both streams are off: set use_continuous=True or semantic_codes > 0")


class FeatureFusion(nn.Module):
    """LN -> Linear(4C -> d) -> SiLU -> LN (Table 4 I)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(F.silu(self.proj(self.norm_in(x))))


AUDIO_CATEGORIES = ("speech", "music", "sound")
"""The corpus's audio categories; Batch.category_B indexes them (an adapter routed by label reads it)."""


@dataclass
class Batch:
    """A collated batch (data.collate): right-padded text, padded audio features.

    input_ids_BL, attention_mask_BL, labels_BL (IGNORE off the answer);
    audio_BFC stacked encoder features and audio_mask_BF, or mels (one (n_mels, T) per sample,
    None for a text-only sample) when the encoder runs in the forward pass;
    category_B each sample's index in AUDIO_CATEGORIES (-1: none).
    """

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    labels_BL: torch.Tensor | None
    audio_BFC: torch.Tensor | None = None
    audio_mask_BF: torch.Tensor | None = None
    mels: list[torch.Tensor | None] | None = None
    category_B: torch.Tensor | None = None

    def to(self, device) -> Batch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        mels = None if self.mels is None else [mv(m) for m in self.mels]
        return Batch(
            mv(self.input_ids_BL),
            mv(self.attention_mask_BL),
            mv(self.labels_BL),
            mv(self.audio_BFC),
            mv(self.audio_mask_BF),
            mels,
            mv(self.category_B),
        )


@dataclass
class LALMOutput:
    ntp_sum: torch.Tensor  # summed next-token cross-entropy over answer tokens
    num_tokens: int  # answer tokens that carried loss
    aux_loss: torch.Tensor | None  # sum of the adapters' weighted balance losses (None: no MoE adapter)


class AudioLLM(nn.Module):
    def __init__(
        self, encoder: WhisperEncoder, adapter: nn.Module, llm: nn.Module, tokenizer, frontend: FrontendConfig
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer
        self.frontend = frontend
        d = frontend.audio_dim
        hidden = llm.get_input_embeddings().embedding_dim
        cfg = getattr(adapter, "config", None)
        if cfg is not None and (getattr(cfg, "in_dim", d) != d or getattr(cfg, "out_dim", hidden) != hidden):
            raise ValueError(
                f"adapter maps {cfg.in_dim} -> {cfg.out_dim}, but the frontend gives d={d} and the "
                f"LLM's hidden size is {hidden}"
            )
        if llm.get_input_embeddings().num_embeddings < tokenizer.vocab_size:
            raise ValueError(
                f"the LLM has {llm.get_input_embeddings().num_embeddings} token embeddings, the "
                f"tokenizer {tokenizer.vocab_size}: resize the LLM's embeddings first"
            )
        self.fusion = FeatureFusion(encoder.stacked_dim, d) if frontend.use_continuous else None
        if frontend.semantic_codes:
            self.semantic = SemanticTokenizer(frontend.semantic_codes, encoder.stacked_dim)
            self.semantic_embed = nn.Embedding(frontend.semantic_codes, d)
        else:
            self.semantic = self.semantic_embed = None
        self._adapter_takes_mask = len(inspect.signature(adapter.forward).parameters) >= 2
        # Run the audio path on zero frames when a batch has no audio, so every data-parallel rank
        # calls the adapter equally often (FSDP units all-gather in forward; a global balance loss
        # all-reduces). Set by the training loop when it runs on several processes.
        self.run_audio_path_always = False

    # ------------------------------------------------------------------ audio
    @property
    def device(self) -> torch.device:
        """Where the parameters are: the device the tools move batches to."""
        return next(self.parameters()).device

    def encode_audio(self, mels: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Stacked encoder features (F_i, 4C) of each clip at its own length; None (no audio) -> (0, 4C)."""
        param = self.encoder.encoder.conv1.weight
        return [self.encoder(m) if m is not None else param.new_zeros(0, self.encoder.stacked_dim) for m in mels]

    @property
    def routes_by_category(self) -> bool:
        """The adapter routes each sample by its audio category (routing="label"): every audio
        example then needs one of AUDIO_CATEGORIES."""
        return getattr(getattr(self.adapter, "config", None), "routing", None) == "label"

    def embed_audio(
        self, audio_BFC: torch.Tensor, audio_mask_BF: torch.Tensor, category_B: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, F, 4C) stacked features -> (B, F, D) LLM-space embeddings; padded frames are zero.
        An adapter routed by label (routing="label") reads each sample's category."""
        x = 0
        if self.fusion is not None:
            x = self.fusion(audio_BFC)
        if self.semantic is not None:
            x = x + self.semantic_embed(self.semantic(audio_BFC))
        if self.routes_by_category:
            if category_B is None:
                raise ValueError("the adapter routes by category (routing='label'): pass the batch's category_B")
            return self.adapter(x, audio_mask_BF, labels=category_B[:, None].expand(audio_mask_BF.shape))
        if self._adapter_takes_mask:
            return self.adapter(x, audio_mask_BF)
        return torch.where(audio_mask_BF[..., None], self.adapter(x), 0)

    def audio_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.audio_BFC is not None:
            return batch.audio_BFC, batch.audio_mask_BF
        feats = self.encode_audio(batch.mels or [])
        return pad_frames(feats, self.encoder.stacked_dim, batch.input_ids_BL.device)

    @property
    def position_limit(self) -> int | None:
        """The LLM's max_position_embeddings: the longest prompt + answer it takes (None: no limit)."""
        return getattr(self.llm.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ text
    def input_embeddings(
        self, input_ids_BL: torch.Tensor, audio_BFD: torch.Tensor | None, audio_mask_BF: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with each `<|audio_pad|>` replaced, in order, by the sample's audio frames."""
        limit = self.position_limit
        if limit is not None and input_ids_BL.shape[1] > limit:
            raise ValueError(
                f"a sequence of {input_ids_BL.shape[1]} positions exceeds the LLM's max_position_embeddings="
                f"{limit}; nothing is truncated: shorten the audio or text"
            )
        emb = self.llm.get_input_embeddings()(input_ids_BL)
        is_pad = input_ids_BL == self.tokenizer.audio_pad_id
        n_text = is_pad.sum(1)
        n_audio = audio_mask_BF.sum(1) if audio_mask_BF is not None else torch.zeros_like(n_text)
        if not torch.equal(n_text, n_audio.to(n_text.dtype)):
            bad = (n_text != n_audio).nonzero()[0, 0].item()
            raise ValueError(
                f"sample {bad} of the batch has {int(n_text[bad])} <|audio_pad|> placeholders but "
                f"{int(n_audio[bad])} audio frames; build prompts with data.prompt_ids"
            )
        if audio_BFD is None or not bool(is_pad.any()):
            return emb
        return emb.masked_scatter(is_pad[..., None], audio_BFD[audio_mask_BF].to(emb.dtype))

    def _answer_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits (N, V) at the positions a label follows, keep_BL marking them, the audio path's
        output or None on a batch without audio)."""
        audio_BFD = audio_mask = None
        if bool((batch.input_ids_BL == self.tokenizer.audio_pad_id).any()):
            feats, audio_mask = self.audio_inputs(batch)
            audio_BFD = self.embed_audio(feats, audio_mask, batch.category_B)
        elif self.run_audio_path_always:
            B, dev = batch.input_ids_BL.shape[0], batch.input_ids_BL.device
            empty_BFC = torch.zeros(B, 0, self.encoder.stacked_dim, device=dev)
            no_audio_BF = torch.zeros(B, 0, dtype=torch.bool, device=dev)
            audio_BFD = self.embed_audio(empty_BFC, no_audio_BF, torch.zeros(B, dtype=torch.long, device=dev))
        emb = self.input_embeddings(batch.input_ids_BL, audio_BFD, audio_mask)
        hidden = self.llm.get_decoder()(inputs_embeds=emb, attention_mask=batch.attention_mask_BL).last_hidden_state
        # Logits only where a label follows: (N, V) instead of (B, L, V).
        keep = batch.labels_BL[:, 1:] != IGNORE
        return self.llm.get_output_embeddings()(hidden[:, :-1][keep]).float(), keep, audio_BFD

    def forward(self, batch: Batch) -> LALMOutput:
        """Next-token loss on the answer tokens (labels != IGNORE) plus the adapters' balance loss."""
        logits, keep, audio_BFD = self._answer_logits(batch)
        ntp_sum = F.cross_entropy(logits, batch.labels_BL[:, 1:][keep], reduction="sum")
        has_audio = audio_BFD is not None and audio_BFD.shape[1] > 0
        if not has_audio and torch.is_grad_enabled():
            ntp_sum = ntp_sum + self._audio_path_anchor()
            if audio_BFD is not None:  # the audio path ran on zero frames (run_audio_path_always)
                ntp_sum = ntp_sum + 0 * audio_BFD.sum()
        aux = total_aux_loss(self.adapter) if has_audio else None
        return LALMOutput(ntp_sum, int(keep.sum()), aux)

    @torch.no_grad()
    def answer_logprobs(self, batch: Batch) -> torch.Tensor:
        """(B,) float64: each sample's summed log-probability of its answer tokens (labels !=
        IGNORE, end of text included) given its prompt, teacher-forced. Scoring every option of a
        multiple-choice question this way picks the one the model finds most likely."""
        logits, keep, _ = self._answer_logits(batch)
        logp = torch.log_softmax(logits.double(), dim=-1).gather(1, batch.labels_BL[:, 1:][keep][:, None])[:, 0]
        rows = keep.nonzero()[:, 0]
        return torch.zeros(keep.shape[0], dtype=torch.float64, device=logp.device).index_add(0, rows, logp)

    def _audio_path_anchor(self) -> torch.Tensor | float:
        """0 x the sum of every trainable audio-path parameter. A text-only batch never runs the
        encoder, fusion, semantic embeddings or adapter; this exact zero joins them to its graph so
        they still get a (zero) gradient, which DistributedDataParallel needs from every parameter
        in every backward ("Expected to have finished reduction in the prior iteration"). The
        parameters of FSDP units other than the root (DTensors here) are left out: FSDP reduces a
        missing gradient as zero (adapter/lalm/training/parallel.py)."""
        parts = (self.encoder, self.fusion, self.semantic_embed, self.adapter)
        params = [
            p for m in parts if m is not None for p in m.parameters() if p.requires_grad and not isinstance(p, DTensor)
        ]
        if not params:
            return 0.0
        return torch.stack([p.sum().float() for p in params]).sum() * 0.0

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy decoding of each prompt (input_ids_BL left-padded, no answer); stops at eos."""
        audio_BFD = audio_mask = None
        if bool((batch.input_ids_BL == self.tokenizer.audio_pad_id).any()):
            feats, audio_mask = self.audio_inputs(batch)
            audio_BFD = self.embed_audio(feats, audio_mask, batch.category_B)
        emb = self.input_embeddings(batch.input_ids_BL, audio_BFD, audio_mask)
        # transformers' own generation loop (greedy, KV cache; position ids from the left-padded
        # attention mask). With inputs_embeds it returns the new tokens only; finished rows are
        # padded with eos after their end.
        eos = self.tokenizer.eos_id
        new_BN = self.llm.generate(
            inputs_embeds=emb,
            attention_mask=batch.attention_mask_BL.long(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=eos,
            use_cache=True,
        )
        result = []
        for row in new_BN.tolist():
            result.append(row[: row.index(eos)] if eos in row else row)
        return result


def pad_frames(feats: list[torch.Tensor], dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-clip (F_i, C) features to (B, F_max, C) with a bool mask (B, F_max)."""
    B = len(feats)
    f_max = max((f.shape[0] for f in feats), default=0)
    dtype = feats[0].dtype if feats else torch.float32
    out = torch.zeros(B, f_max, dim, dtype=dtype, device=device)
    mask = torch.zeros(B, f_max, dtype=torch.bool, device=device)
    for b, f in enumerate(feats):
        out[b, : f.shape[0]] = f
        mask[b, : f.shape[0]] = True
    return out, mask
