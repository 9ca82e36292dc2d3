"""Text tokenizers with the audio placeholder tokens `<|audio_start|>`, `<|audio_pad|>`, `<|audio_end|>`.

- `GPT2AudioTokenizer`: works offline with nothing downloaded: GPT-2's byte-level BPE as
  openai-whisper ships it (assets/gpt2.tiktoken), plus `<|endoftext|>` and the audio tokens.
- `HFAudioTokenizer`: any `transformers` tokenizer saved in a local directory (Qwen3's, for the
  paper's model); the audio tokens are added when it lacks them.
"""

from __future__ import annotations

import base64
from pathlib import Path

AUDIO_START, AUDIO_PAD, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
AUDIO_TOKENS = (AUDIO_START, AUDIO_PAD, AUDIO_END)


class GPT2AudioTokenizer:
    """tiktoken GPT-2 BPE (offline) with ids 50256 `<|endoftext|>` and 50257-50259 the audio tokens."""

    name = "gpt2-offline"

    def __init__(self) -> None:
        import tiktoken
        import whisper.tokenizer

        path = Path(whisper.tokenizer.__file__).parent / "assets" / "gpt2.tiktoken"
        with open(path) as fh:
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in fh if line.strip())}
        n = len(ranks)
        specials = {"<|endoftext|>": n, **{tok: n + 1 + i for i, tok in enumerate(AUDIO_TOKENS)}}
        self._enc = tiktoken.Encoding(
            name="gpt2-audio",
            explicit_n_vocab=n + len(specials),
            pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.vocab_size = n + len(specials)
        self.eos_id = specials["<|endoftext|>"]
        self.pad_id = self.eos_id
        self.audio_start_id, self.audio_pad_id, self.audio_end_id = (specials[t] for t in AUDIO_TOKENS)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in `text` are encoded as text, never as specials."""
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids if int(i) < self.eos_id])


class HFAudioTokenizer:
    """A transformers tokenizer from a local directory, with the audio tokens added if missing."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        self.name = str(path)
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        missing = [t for t in AUDIO_TOKENS if t not in self._tok.get_vocab()]
        if missing:
            self._tok.add_special_tokens({"additional_special_tokens": missing})
        self.vocab_size = len(self._tok)
        self.audio_start_id, self.audio_pad_id, self.audio_end_id = (
            self._tok.convert_tokens_to_ids(t) for t in AUDIO_TOKENS
        )
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer in {path} defines no eos token")
        self.eos_id = eos
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self._tok.save_pretrained(str(path))


def load_tokenizer(spec: str) -> GPT2AudioTokenizer | HFAudioTokenizer:
    """ "gpt2-offline", or a local directory holding a transformers tokenizer."""
    if spec == GPT2AudioTokenizer.name:
        return GPT2AudioTokenizer()
    return HFAudioTokenizer(spec)
