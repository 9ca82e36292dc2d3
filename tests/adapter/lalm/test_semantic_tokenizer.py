"""The k-means semantic tokenizer and both text tokenizers (offline GPT-2, a local HF directory)."""

import pytest
import torch

from adapter.lalm.semantic import SemanticTokenizer, _squared_distances
from adapter.lalm.tokenizer import AUDIO_TOKENS, GPT2AudioTokenizer, HFAudioTokenizer, load_tokenizer


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.randint(3, (300,), generator=g)
    x = centers[labels] + 0.3 * torch.randn(300, 2, generator=g)
    tok = SemanticTokenizer(3, 2).fit(x, seed=1)
    ids = tok(x)
    # one code per true cluster: the mapping label -> code is a bijection
    pairs = {(int(a), int(b)) for a, b in zip(labels, ids, strict=True)}
    assert len(pairs) == 3 and len({b for _, b in pairs}) == 3
    again = SemanticTokenizer(3, 2).fit(x, seed=1)
    assert torch.equal(tok.codebook, again.codebook)
    loaded = SemanticTokenizer(3, 2)
    loaded.load_state_dict(tok.state_dict())
    assert torch.equal(loaded(x), ids)


def test_codes_are_the_nearest_centroids_in_float64():
    """Fit and lookup use ||c||^2 - 2 x.c in float32; the ids must be float64's exact nearest
    centroid wherever the two nearest differ by more than float32 rounding can move them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 48, generator=g) * 3 + 1  # an offset, so ||x||^2 is large against the differences
    tok = SemanticTokenizer(16, 48).fit(x, seed=0)
    ids = tok(x.view(20, 30, 48))  # a (B, F, dim) batch, as the model passes it
    assert ids.shape == (20, 30) and ids.dtype == torch.int64
    d2 = torch.cdist(x.double(), tok.codebook.double()).pow(2)
    two = d2.topk(2, dim=1, largest=False).values
    # float32 rounding of a distance is about eps * (||x||^2 + ||c||^2) (each term's size);
    # a gap between the two nearest 100 times that is no tie
    scale = x.double().pow(2).sum(1, keepdim=True) + tok.codebook.double().pow(2).sum(1)
    clear = (two[:, 1] - two[:, 0]) > 100 * torch.finfo(torch.float32).eps * scale.max(1).values
    assert clear.float().mean() > 0.95  # the check is not vacuous
    assert torch.equal(ids.reshape(-1)[clear], d2.argmin(1)[clear])
    # the squared distances k-means++ samples by: within that rounding of float64's, never negative
    sq = _squared_distances(x, x.pow(2).sum(1), tok.codebook)
    err = (sq.double() - d2).abs() / scale
    assert err.max() < 8 * torch.finfo(torch.float32).eps, f"max relative error {err.max():.3g}"
    assert sq.min() >= 0


def test_semantic_tokenizer_errors():
    with pytest.raises(RuntimeError, match="fit must run"):
        SemanticTokenizer(4, 2)(torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least 4 frames"):
        SemanticTokenizer(4, 2).fit(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"expected features \(N, 2\)"):
        SemanticTokenizer(4, 2).fit(torch.randn(30, 3))
    bad = torch.randn(30, 2)
    bad[7, 1] = float("nan")
    bad[9, 0] = float("inf")
    with pytest.raises(ValueError, match="must be finite; 2 of 30 frames hold NaN or inf"):
        SemanticTokenizer(4, 2).fit(bad)


def test_offline_gpt2_tokenizer():
    tok = load_tokenizer("gpt2-offline")
    assert isinstance(tok, GPT2AudioTokenizer)
    assert (tok.eos_id, tok.audio_start_id, tok.audio_pad_id, tok.audio_end_id, tok.vocab_size) == (
        50256,
        50257,
        50258,
        50259,
        50260,
    )
    ids = tok.encode("Hello world, is the tone high?")
    assert tok.decode(ids) == "Hello world, is the tone high?"
    assert tok.audio_pad_id not in tok.encode("<|audio_pad|>")  # text never becomes a placeholder
    assert tok.decode([*ids, tok.eos_id, tok.audio_pad_id]) == "Hello world, is the tone high?"


def test_local_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "is", "the", "tone", "high", "low", "?", "Answer", ":"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFAudioTokenizer)
    assert tok.vocab_size == 10 + len(AUDIO_TOKENS) and tok.audio_pad_id >= 10 and tok.eos_id == 1
    assert tok.decode(tok.encode("is the tone high ?")) == "is the tone high ?"
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "absent"))
