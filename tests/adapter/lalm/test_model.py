"""AudioLLM: placeholder replacement, answer-only loss, the two streams, any adapter, local LLM
directories, and greedy decoding."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter.lalm.assemble import build_model, tiny_qwen3
from adapter.lalm.config import ModelConfig
from adapter.lalm.data import FeatureSource, collate, read_manifest
from adapter.lalm.model import IGNORE, AudioLLM


def _model(**kw):
    cfg = ModelConfig(**{"encoder": "demo", "audio_dim": 32, "tiny_llm_hidden": 64, "adapter_backend": "torch", **kw})
    model = build_model(cfg, seed=0)
    return model


@pytest.fixture(scope="module")
def examples(tone_corpus):
    return read_manifest(tone_corpus[0])[:6]


def _batch(model, examples, **kw):
    return collate(examples, model.tokenizer, FeatureSource(80, encoder=model.encoder), **kw)


def test_loss_is_next_token_ce_on_answer_tokens_only(examples):
    model = _model()
    batch = _batch(model, examples)
    out = model(batch)
    # Recompute from full logits: placeholders replaced by the adapter's outputs, CE where labels exist.
    feats, mask = model.audio_inputs(batch)
    emb = model.input_embeddings(batch.input_ids_BL, model.embed_audio(feats, mask), mask)
    logits = model.llm(inputs_embeds=emb, attention_mask=batch.attention_mask_BL).logits[:, :-1].float()
    target = batch.labels_BL[:, 1:]
    want = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    assert torch.allclose(out.ntp_sum, want, rtol=1e-5)
    n_answer = sum(len(model.tokenizer.encode(f" {ex.answer}")) + 1 for ex in examples)
    assert out.num_tokens == n_answer
    assert out.aux_loss is not None and out.aux_loss > 0
    (out.ntp_sum + out.aux_loss).backward()
    assert model.adapter.w1.grad.abs().sum() > 0 and model.fusion.proj.weight.grad.abs().sum() > 0


def test_placeholders_must_match_frames(examples):
    model = _model()
    batch = _batch(model, examples[:2])
    pad = model.tokenizer.audio_pad_id
    row = batch.input_ids_BL[1]
    first = int((row == pad).nonzero()[0, 0])
    batch.input_ids_BL[1, first] = model.tokenizer.encode(" x")[0]  # one placeholder fewer
    with pytest.raises(ValueError, match=r"sample 1 of the batch has \d+ <\|audio_pad\|> placeholders but \d+ audio"):
        model(batch)


@pytest.mark.parametrize("streams", [dict(semantic_codes=8), dict(semantic_codes=8, use_continuous=False), {}])
def test_dual_stream_switches(examples, streams):
    model = _model(**streams)
    if model.semantic is not None:
        src = FeatureSource(80, encoder=model.encoder)
        model.semantic.fit(torch.cat([src.features(ex) for ex in examples]), seed=0)
    assert (model.fusion is not None) == streams.get("use_continuous", True)
    assert (model.semantic is not None) == bool(streams.get("semantic_codes"))
    out = model(_batch(model, examples))
    assert torch.isfinite(out.ntp_sum)


class LinearAdapter(nn.Module):
    """A user's adapter with no mask argument."""

    def __init__(self, d, D):
        super().__init__()
        self.lin = nn.Linear(d, D)

    def forward(self, x):
        return self.lin(x)


def test_any_adapter_module(examples):
    base = _model(adapter="dense")
    assert base(_batch(base, examples)).aux_loss is None  # no MoE adapter: no balance loss
    custom = AudioLLM(base.encoder, LinearAdapter(32, 64), base.llm, base.tokenizer, base.frontend)
    assert torch.isfinite(custom(_batch(custom, examples)).ntp_sum)
    with pytest.raises(ValueError, match="adapter maps 16 -> 64, but the frontend gives d=32"):
        from adapter import preset
        from adapter.presets import build_adapter

        AudioLLM(base.encoder, build_adapter(preset("moe-8c4", 16, 64)), base.llm, base.tokenizer, base.frontend)


def test_llm_from_a_local_directory(tmp_path, examples):
    tiny = tiny_qwen3(50260, hidden=64, layers=2, seed=0)
    tiny.save_pretrained(tmp_path / "llm")
    from_dir = _model(llm=str(tmp_path / "llm"))
    in_mem = _model()
    in_mem.llm.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        a = from_dir(_batch(from_dir, examples)).ntp_sum
        b = in_mem(_batch(in_mem, examples)).ntp_sum
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        _model(llm=str(tmp_path / "no-such-model"))


def _assert_greedy(model, example, tokens: list[int], max_new_tokens: int) -> None:
    """Each token is the argmax of a cache-free forward of the example alone over the same prefix,
    up to float rounding (1e-4: a cached, batched, left-padded decode sums in other orders and
    at other shapes, so exact token equality could flip on a near tie on another CPU)."""
    batch = _batch(model, [example], with_answer=False, left_pad=True)
    feats, mask = model.audio_inputs(batch)
    emb = model.input_embeddings(batch.input_ids_BL, model.embed_audio(feats, mask), mask)
    ended = len(tokens) < max_new_tokens
    with torch.no_grad():
        for token in tokens + ([model.tokenizer.eos_id] if ended else []):
            logits = model.llm(inputs_embeds=emb).logits[0, -1]
            assert logits[token] >= logits.max() - 1e-4, (token, int(logits.argmax()))
            emb = torch.cat([emb, model.llm.get_input_embeddings()(torch.tensor([[token]]))], 1)


def test_generation_uses_the_current_transformers_api(examples):
    """No deprecation warnings from transformers (the KV-cache keyword was renamed in 5.x): the
    decoding goes through `generate`, greedy."""
    import warnings

    model = _model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning or DeprecationWarning fails the test
        got = model.generate(_batch(model, examples[:1], with_answer=False, left_pad=True), max_new_tokens=4)[0]
    _assert_greedy(model, examples[0], got, 4)


def test_greedy_generation_batched_equals_one_by_one(examples):
    """Left padding and position ids: every row of a batched decode is the greedy decode of its
    example alone."""
    model = _model().eval()
    both = model.generate(_batch(model, examples[:3], with_answer=False, left_pad=True), max_new_tokens=6)
    assert len(both) == 3 and all(len(r) <= 6 for r in both)
    for ex, tokens in zip(examples[:3], both, strict=True):
        _assert_greedy(model, ex, tokens, 6)
    text = _batch(model, examples[:2], with_answer=False, left_pad=True, use_text_question=True)
    assert (text.input_ids_BL == model.tokenizer.audio_pad_id).sum() == 0
    assert len(model.generate(text, max_new_tokens=3)) == 2


def test_answer_logprobs_are_the_per_sample_answer_loss(examples):
    model = _model().eval()
    mixed = [examples[0], dataclasses.replace(examples[1], audio=None, num_samples=0), examples[2]]
    batch = _batch(model, mixed)
    lp = model.answer_logprobs(batch)
    assert lp.dtype == torch.float64 and lp.shape == (3,) and (lp < 0).all()
    # The batch's summed answer loss, in float32 against float64 here.
    assert lp.sum().item() == pytest.approx(-model(batch).ntp_sum.item(), rel=1e-5)
    for i, ex in enumerate(mixed):  # alone, without the others' padding: float rounding only
        assert model.answer_logprobs(_batch(model, [ex]))[0].item() == pytest.approx(lp[i].item(), rel=1e-4)


def test_label_routed_adapter_reads_each_samples_category(examples, tone_corpus):
    from adapter.lalm.evaluate import evaluate

    model = _model(adapter="moe-8c1", routing="label")  # 8 experts: speech 0-1, music 2-3, sound 4-5
    assert model.adapter.config.num_labels == 3
    batch = _batch(model, examples)  # tone clips: category "sound"
    assert batch.category_B.tolist() == [2] * len(examples)
    model(batch)
    chosen = model.adapter.last_topk_idx
    assert set(chosen[chosen >= 0].tolist()) <= {4, 5}
    result = evaluate(model, read_manifest(tone_corpus[1])[:3], FeatureSource(80, encoder=model.encoder))
    assert set(result["expert_rates"]) == {"sound"} and sum(result["expert_rates"]["sound"][4:6]) == 1.0
    unlabeled = [dataclasses.replace(ex, category="") for ex in examples[:2]]
    with pytest.raises(ValueError, match=r"labels of real tokens must be in \[0, 3\)"):
        model(_batch(model, unlabeled))


def test_model_config_sizes_the_adapter_it_builds():
    """adapter_width, num_experts and top_k reach the built adapter; nonsense is refused."""
    model = _model(adapter="moe-8c4-matched-parallel", adapter_width=0.5, num_experts=12, routing="label")
    cfg = model.adapter.config
    assert (cfg.num_experts, cfg.top_k, cfg.aggregation_dim, cfg.num_labels) == (12, 4, 64, 3)
    dense = _model(adapter="dense", adapter_width=0.5).adapter
    built = sum(p.numel() for p in model.adapter.parameters())
    assert abs(built - sum(p.numel() for p in dense.parameters())) <= 12 * (32 + 64) / 2  # equal totals
    assert _model(adapter="moe-8c4", top_k=2).adapter.config.top_k == 2
    with pytest.raises(ValueError, match="the dense adapter has no experts"):
        ModelConfig(adapter="dense", num_experts=4)
    with pytest.raises(ValueError, match="adapter_width must be a positive finite number, got -1"):
        ModelConfig(adapter_width=-1.0)


def test_a_context_stands_between_the_audio_markers(tmp_path, tone_corpus):
    """A text-only example's context sits where audio frames would: <|audio_start|> context
    <|audio_end|>, then the question; length batching counts it; audio and a context together are
    refused, naming the line."""
    import json

    from adapter.lalm.data import prompt_ids

    model = _model()
    tok = model.tokenizer
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"id": "c", "question": "Is the tone high or low?", "answer": "low", "context": "low tone"},
        {"id": "q", "question": "Is the tone high or low?", "answer": "low"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_context, plain = read_manifest(manifest)
    ids = prompt_ids(tok, 0, with_context.question, with_context.context)
    ctx = tok.encode("low tone")
    assert ids[: len(ctx) + 2] == [tok.audio_start_id, *ctx, tok.audio_end_id]
    assert ids[len(ctx) + 2 :] == prompt_ids(tok, 0, plain.question)
    batch = _batch(model, [with_context, plain])
    assert batch.audio_BFC is None and batch.input_ids_BL[0, : len(ids)].tolist() == ids
    assert model(batch).ntp_sum.isfinite()
    # Asked as text (the modality gap's text side), the question alone: no context, no markers.
    as_text = _batch(model, [with_context], use_text_question=True, with_answer=False).input_ids_BL[0].tolist()
    assert as_text == prompt_ids(tok, 0, with_context.question)
    with pytest.raises(ValueError, match="audio frames or a context, not both"):
        prompt_ids(tok, 3, "q", "ctx")
    bad = tmp_path / "bad.jsonl"
    audio = str(tone_corpus[0].parent / "c0.wav")
    bad.write_text(json.dumps({"id": "x", "question": "q", "audio": audio, "context": "a tone"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: an example has either audio or a context"):
        read_manifest(bad)
