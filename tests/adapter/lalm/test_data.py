"""adapter/lalm/data.py: manifests (read, weighted, refused with file and line), length batches,
the resumable batch stream and its shares per rank, and collate (labels, padding, text-only)."""

import json

import pytest
import torch

from adapter.lalm.data import (
    BatchStream,
    DataPosition,
    Example,
    FeatureSource,
    answer_ids,
    collate,
    distinct_clips,
    length_batches,
    prompt_ids,
    read_manifest,
    read_manifests,
)
from adapter.lalm.model import IGNORE
from adapter.lalm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-offline")


def _texts(n: int) -> list[Example]:
    """Text-only examples of varied lengths (no audio: nothing to encode)."""
    return [Example(id=f"t{i}", question="word " * (1 + i % 7), answer=str(i)) for i in range(n)]


def test_manifest_paths_resolve_beside_it_and_lengths_come_from_headers(tone_corpus):
    train = read_manifest(tone_corpus[0])
    assert len(train) == 32 and all(ex.audio.is_absolute() and ex.audio.parent == tone_corpus[0].parent for ex in train)
    assert all(ex.num_samples > 0 and ex.num_frames > 0 for ex in train)
    assert train[0].source == f"{tone_corpus[0]}:1" and train[5].source == f"{tone_corpus[0]}:6"


def test_weighted_manifests_repeat_and_bad_weights_are_refused(tone_corpus):
    once, twice = read_manifests(str(tone_corpus[1])), read_manifests(f"{tone_corpus[1]}*2,{tone_corpus[0]}")
    assert [ex.id for ex in twice[: 2 * len(once)]] == [ex.id for ex in once] * 2
    assert len(distinct_clips(twice)) == len(once) + 32  # a clip listed twice is one clip
    for bad in ("*0", "*x", "*-1"):
        with pytest.raises(ValueError, match="manifest weight must be a positive integer"):
            read_manifests(f"{tone_corpus[1]}{bad}")


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"id": "a"}), r"missing field\(s\) \['question'\]"),
        (json.dumps({"id": "a", "question": "q", "audio": "c0.wav", "context": "x"}), "either audio or a context"),
    ],
)
def test_bad_manifest_lines_name_file_and_line(tmp_path, line, match):
    (tmp_path / "c0.wav").write_bytes(b"")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "ok", "question": "q"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"m.jsonl:3: .*{match}"):
        read_manifest(manifest)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "absent.jsonl")


def test_length_batches_cover_every_example_once_within_the_limits(tok):
    examples = _texts(97)
    sizes = [len(prompt_ids(tok, 0, ex.question)) + len(answer_ids(tok, ex.answer)) for ex in examples]
    batches = length_batches(examples, tok, max_batch_tokens=60, max_batch_size=5, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(97))
    assert all(len(b) <= 5 for b in batches)
    padded = [max(sizes[i] for i in b) * len(b) for b in batches]
    assert all(p <= 60 or len(b) == 1 for p, b in zip(padded, batches, strict=True)), padded
    again = length_batches(examples, tok, max_batch_tokens=60, max_batch_size=5, seed=3, epoch=0)
    other = length_batches(examples, tok, max_batch_tokens=60, max_batch_size=5, seed=3, epoch=1)
    assert again == batches and other != batches  # the order is (seed, epoch)'s


def test_the_stream_resumes_at_its_position_and_ranks_split_each_step(tok):
    examples = _texts(40)
    kw = dict(max_batch_tokens=40, max_batch_size=4, seed=1)
    whole = BatchStream(examples, tok, per_step=2, **kw)
    steps = [[[ex.id for ex in b] for b in whole.next_step()] for _ in range(15)]  # crosses an epoch
    assert whole.position.epoch >= 1
    stopped = BatchStream(examples, tok, per_step=2, **kw)
    for _ in range(7):
        stopped.next_step()
    resumed = BatchStream(examples, tok, per_step=2, position=DataPosition(**vars(stopped.position)), **kw)
    assert [[[ex.id for ex in b] for b in resumed.next_step()] for _ in range(8)] == steps[7:]
    ranks = [BatchStream(examples, tok, per_step=2, rank=r, world=2, **kw) for r in (0, 1)]
    for step in steps[:5]:
        assert [[ex.id for ex in b] for r in ranks for b in r.next_step()] == step  # rank r takes batch r
    with pytest.raises(ValueError, match="per_step=3 batches per step must be divisible by world=2"):
        BatchStream(examples, tok, per_step=3, world=2, **kw)
    with pytest.raises(ValueError, match="fewer than the 50 one step needs"):
        BatchStream(examples, tok, per_step=50, **kw).next_step()


def test_collate_labels_only_the_answer_and_pads_for_generation(tok):
    a, b = Example(id="a", question="Say one word.", answer="yes"), Example(id="b", question="Hi?", answer="no")
    batch = collate([a, b], tok, FeatureSource(80))
    assert batch.audio_BFC is None and batch.mels is None  # text only: nothing of audio
    for row in range(2):
        ids, labels, mask = batch.input_ids_BL[row], batch.labels_BL[row], batch.attention_mask_BL[row]
        labelled = labels != IGNORE
        assert labelled.sum() == len(answer_ids(tok, (a, b)[row].answer))
        assert torch.equal(ids[labelled], labels[labelled]) and bool(mask[labelled].all())
        assert not bool(labelled[: int(mask.sum()) - int(labelled.sum())].any())  # the prompt is never a label
    prompts = collate([a, b], tok, FeatureSource(80), with_answer=False, left_pad=True)
    assert prompts.labels_BL is None and bool(prompts.attention_mask_BL[:, -1].all())  # right-aligned
    assert not bool(prompts.attention_mask_BL[1, 0])  # the shorter prompt is padded on the left


@pytest.mark.parametrize(
    "record, match",
    [
        ({"id": "a", "question": None, "answer": "x"}, "'question' must be str, got None"),
        ({"id": "a", "question": "q", "audio": 5}, "'audio' must be str or null, got 5"),
        ({"id": "a", "question": "q", "choices": "ab"}, "'choices' must be list"),
        ({"id": "a", "question": "q", "choices": ["a", 2]}, "every entry of 'choices'"),
        ({"id": True, "question": "q"}, "'id' must be str or int"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_manifest_fields_of_the_wrong_type_name_file_and_line(tmp_path, record, match):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "fine", "question": "q"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"m.jsonl:2: .*{match}"):
        read_manifest(manifest)


def test_repeated_ids_are_refused_with_file_and_lines(tmp_path):
    """Issue 39 item 3: a repeated id was accepted and paired.aligned then paired the wrong items."""
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "question": "q"}, {"id": 7, "question": "q"}, {"id": "7", "question": "q"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"m.jsonl:3: id '7' repeats line 2; ids must be unique"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    "encode, match",
    [
        (lambda t: t.encode("utf-16"), r"m.jsonl: the manifest is UTF-16; write it as UTF-8"),
        (lambda t: t.encode("latin-1"), r"m.jsonl:2: not UTF-8 \(byte 0xe9 at column 32\).*iconv -f LATIN1"),
    ],
)
def test_manifests_in_other_encodings_are_named(tmp_path, encode, match):
    """Issue 39 item 15: a UTF-16 or Latin-1 manifest raised a raw UnicodeDecodeError."""
    manifest = tmp_path / "m.jsonl"
    text = '{"id": "a", "question": "q"}\n{"id": "b", "question": "Le caf\u00e9?"}\n'
    manifest.write_bytes(encode(text))
    with pytest.raises(ValueError, match=match):
        read_manifest(manifest)
    manifest.write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8 with a byte-order mark: read
    assert [ex.question for ex in read_manifest(manifest)] == ["q", "Le caf\u00e9?"]
