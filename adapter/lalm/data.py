"""Data for the reference LALM: manifests, prompts with audio placeholders, features, batches.

A manifest is JSONL, one example per line:
    {"id": "...", "audio": "clips/x.wav" (relative to the manifest, or absolute; omit or null for
     a text-only example), "question": "...", "answer": "...", optional "category", "task",
     "choices": [...], "text": the question as plain text for the modality-gap evaluation,
     "context": for a text-only example, text that stands where audio would (a caption)}

Prompt layout (ids):  <|audio_start|> <|audio_pad|> x F <|audio_end|> "\\n{question}\\nAnswer:"  and the
answer " {answer}" <eos>, where F = audio.audio_frames(samples): placeholders and frames always
agree. A text-only example with a context has the context's tokens between the audio markers
(<|audio_start|> context <|audio_end|>), so a backbone can learn to read what audio will later
stand for. Loss falls on the answer tokens only.

Batches are formed by length (examples of similar size together, so little is padding), in an
order that is a pure function of (seed, epoch): a run can resume at any batch, and R ranks take
every R-th batch of the same list.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
import torch
from safetensors.torch import load_file, save_file

from adapter.files import atomic_write, atomic_write_text
from adapter.lalm.audio import HOP_LENGTH, SAMPLE_RATE, STACK, audio_frames, load_audio, log_mel
from adapter.lalm.model import AUDIO_CATEGORIES, IGNORE, Batch, pad_frames


@dataclass
class Example:
    id: str
    question: str
    answer: str = ""
    audio: Path | None = None
    category: str = ""
    task: str = ""
    choices: list[str] = field(default_factory=list)
    text: str = ""  # the question as plain text (modality-gap evaluation)
    context: str = ""  # text-only examples: what stands between the audio markers instead of audio
    eval: str = "mmau"  # how answers are scored: "mmau" (choice text) or "voicebench" (a letter)
    num_samples: int = 0  # at 16 kHz, after resampling (0 for text-only)
    source: str = ""  # "manifest:line" it came from, for error messages

    @property
    def num_frames(self) -> int:
        return audio_frames(self.num_samples) if self.audio is not None else 0


def resampled_length(path: Path) -> int:
    """Samples at 16 kHz of a file, from its header (scipy's resample_poly output length)."""
    if not Path(path).is_file():  # libsndfile says only "System error"
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        info = soundfile.info(str(path))
    except Exception as exc:
        from adapter.lalm.audio import AudioError

        raise AudioError(f"cannot read audio header of {path}: {exc}") from exc
    if info.samplerate == SAMPLE_RATE:
        return info.frames
    g = math.gcd(info.samplerate, SAMPLE_RATE)
    return math.ceil(info.frames * (SAMPLE_RATE // g) / (info.samplerate // g))


# Manifest fields and the JSON types they take (a null "question" must not become the text "None").
_FIELD_TYPES = {
    "id": (str, int),
    "question": (str,),
    "answer": (str,),
    "audio": (str, type(None)),
    "category": (str,),
    "task": (str,),
    "text": (str,),
    "context": (str,),
    "eval": (str,),
    "choices": (list,),
}


def _check_record_types(rec: dict, where: str) -> None:
    for key, types in _FIELD_TYPES.items():
        if key in rec and (not isinstance(rec[key], types) or isinstance(rec[key], bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{where}: field {key!r} must be {want}, got {rec[key]!r}")
    if any(not isinstance(c, str) for c in rec.get("choices", [])):
        raise ValueError(f"{where}: every entry of 'choices' must be a string, got {rec['choices']!r}")
    if rec.get("eval", "mmau") not in ("mmau", "voicebench"):
        raise ValueError(f"{where}: 'eval' must be 'mmau' or 'voicebench', got {rec['eval']!r}")
    choices, answer = rec.get("choices", []), rec.get("answer")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: 'choices' repeat an option: {choices!r}")
    if choices and answer not in choices:
        # Scored by exact choice: an answer outside them could never be right.
        raise ValueError(f"{where}: 'answer' {answer!r} is not one of the choices {choices!r}")
    if rec.get("eval") == "voicebench" and answer not in tuple("ABCD"):
        raise ValueError(f"{where}: a voicebench item's 'answer' must be a letter A-D, got {answer!r}")


def read_manifest(path: str | Path) -> list[Example]:
    """Examples of a JSONL manifest, with audio paths resolved and lengths read from file headers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    examples = []
    first_line: dict[str, int] = {}  # id -> the line that gave it first
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path}: the manifest is UTF-16; write it as UTF-8 (iconv -f UTF-16 -t UTF-8)")
    for lineno, raw_line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}:{lineno}: not UTF-8 (byte {raw_line[exc.start]:#04x} at column {exc.start + 1}); write "
                "the manifest as UTF-8 (from Latin-1: iconv -f LATIN1 -t UTF-8)"
            ) from exc
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in ("id", "question") if k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        _check_record_types(rec, f"{path}:{lineno}")
        # Items are paired, scored and reported by id: a repeated one would pair the wrong items.
        if (earlier := first_line.setdefault(str(rec["id"]), lineno)) != lineno:
            raise ValueError(f"{path}:{lineno}: id {str(rec['id'])!r} repeats line {earlier}; ids must be unique")
        audio = None
        if rec.get("audio"):
            audio = Path(rec["audio"])
            audio = audio if audio.is_absolute() else path.parent / audio
        ex = Example(
            id=str(rec["id"]),
            question=rec["question"],
            answer=rec.get("answer", ""),
            audio=audio,
            category=rec.get("category", ""),
            task=rec.get("task", ""),
            choices=rec.get("choices", []),
            text=rec.get("text", ""),
            context=rec.get("context", ""),
            eval=rec.get("eval", "mmau"),
            source=f"{path}:{lineno}",
        )
        if audio is not None and ex.context:
            raise ValueError(f"{path}:{lineno}: an example has either audio or a context, not both")
        if audio is not None:
            try:  # a missing file or an unreadable header, with the manifest line
                ex.num_samples = resampled_length(audio)
            except (ValueError, FileNotFoundError) as exc:
                raise type(exc)(f"{path}:{lineno}: {exc}") from exc
        examples.append(ex)
    return examples


def read_manifests(spec: str) -> list[Example]:
    """Examples of one manifest or several, comma-separated; "path*N" repeats a manifest N times
    (upweights it in every epoch)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path, _, times = part.partition("*")
        if times and (not times.isdigit() or int(times) < 1):
            raise ValueError(f"manifest weight must be a positive integer: {part!r}")
        out += read_manifest(path) * (int(times) if times else 1)
    return out


def write_manifest(path: str | Path, records: list[dict]) -> None:
    """Write records as JSONL atomically (temp file, then rename)."""
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))


def prompt_ids(tokenizer, num_frames: int, question: str, context: str = "") -> list[int]:
    """The prompt: audio placeholders (num_frames > 0), or a context between the audio markers,
    or neither, then the question."""
    if num_frames and context:
        raise ValueError("a prompt has audio frames or a context, not both")
    inner = [tokenizer.audio_pad_id] * num_frames if num_frames else tokenizer.encode(context) if context else []
    audio = [tokenizer.audio_start_id, *inner, tokenizer.audio_end_id] if inner else []
    return audio + tokenizer.encode(f"\n{question}\nAnswer:")


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer.encode(f" {answer}") + [tokenizer.eos_id]


def category_index(category: str) -> int:
    """The index of an audio category in AUDIO_CATEGORIES, in any case ("Sound" is "sound"); -1: none."""
    folded = category.casefold()
    return AUDIO_CATEGORIES.index(folded) if folded in AUDIO_CATEGORIES else -1


def check_categories(examples: list[Example]) -> None:
    """For a model that routes by category: every audio example names one of AUDIO_CATEGORIES
    (any case), or it is refused with its manifest line before any work."""
    odd = [ex for ex in examples if ex.audio is not None and category_index(ex.category) < 0]
    if odd:
        ex = odd[0]
        raise ValueError(
            f"{ex.source or ex.id}: the adapter routes by audio category (routing='label'), which must be one of "
            f"{AUDIO_CATEGORIES}, got {ex.category!r} ({len(odd)} audio example(s) without one)"
        )


def check_lengths(examples: list[Example], tokenizer, limit: int | None, *, with_answer: bool = True) -> None:
    """Refuse, before training or evaluation starts, examples whose prompt (and answer) take more
    positions than the LLM has (`limit`, its max_position_embeddings; None: no limit): a long clip
    would otherwise stop a run at the step that meets it, and again on every resume. Names the
    manifest line, the clip's length and the longest clip that fits."""
    if limit is None:
        return
    too_long = []
    for ex in examples:
        n = len(prompt_ids(tokenizer, ex.num_frames, ex.question, "" if ex.num_frames else ex.context))
        # The answer, or the longest option (evaluation scores each choice in its place).
        n += max(len(answer_ids(tokenizer, a)) for a in [ex.answer, *ex.choices]) if with_answer else 0
        if n > limit:
            too_long.append((ex, n))
    if too_long:
        ex, n = too_long[0]
        seconds = ex.num_samples / SAMPLE_RATE
        spare = limit - (n - ex.num_frames)  # positions left for audio frames beside this text
        fits = max(0, spare) * HOP_LENGTH * STACK * 2 / SAMPLE_RATE  # frames -> seconds (12.5 Hz)
        raise ValueError(
            f"{ex.source or ex.id}: {n} positions ({ex.num_frames} audio frames of a {seconds:.1f} s clip, then the "
            f"text) exceed the LLM's {limit} (max_position_embeddings); crop the clip to at most {fits:.0f} s or "
            f"split it into parts ({len(too_long)} example(s) too long in all)"
        )


def encoder_fingerprint(encoder) -> str:
    """A digest of an encoder's weights (names, shapes, dtypes, values): features cached under it
    can only have come from this very encoder, whatever it is called or however it was seeded."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def _audio_key(path: Path) -> str:
    """One audio file's identity: its resolved path, size and modification time."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def distinct_clips(examples: list[Example]) -> list[Example]:
    """The first example of each audio file, in order (a weighted manifest lists a clip N times)."""
    return list({str(ex.audio): ex for ex in examples if ex.audio is not None}.values())


class FeatureSource:
    """Audio of examples as the model consumes it: mels (the encoder trains) or stacked encoder
    features computed once and kept (the encoder is frozen: the usual, much cheaper setting).

    With `cache_dir`, a frozen encoder's features go to disk instead, under
    `cache_dir/<encoder_fingerprint>/<audio key>.safetensors` (written atomically), are read from
    there when needed (the OS's page cache keeps them warm), and later runs with the same encoder
    read them instead of encoding again; another encoder, or an audio file that changed, never
    matches a stale entry. In memory they would take 4 x 4C bytes per frame for every clip, in
    every process: 0.9 GB per hour of audio with Whisper large-v3 (4C = 5120, 12.5 frames/s).
    `cache` (default: when there is no cache_dir) keeps them in memory as well."""

    def __init__(
        self, n_mels: int, encoder=None, cache: bool | None = None, cache_dir: str | Path | None = None
    ) -> None:
        self.n_mels = n_mels
        self.encoder = encoder
        self.cache = (cache_dir is None if cache is None else cache) and encoder is not None
        self._store: dict[str, torch.Tensor] = {}
        self.cache_dir = None
        if cache_dir is not None and encoder is not None:
            self.cache_dir = Path(cache_dir) / encoder_fingerprint(encoder)

    def mel(self, ex: Example) -> torch.Tensor:
        try:
            samples = load_audio(ex.audio)
        except ValueError as exc:  # AudioError: name the manifest line too
            raise type(exc)(f"{ex.source}: {exc}" if ex.source else str(exc)) from exc
        mel = log_mel(samples, self.n_mels)
        if mel.shape[1] != ex.num_samples // HOP_LENGTH:
            raise ValueError(f"{ex.audio}: header says {ex.num_samples} samples, decoded {mel.shape[1] * HOP_LENGTH}+")
        return mel

    @torch.no_grad()
    def features(self, ex: Example) -> torch.Tensor:
        key = str(ex.audio)
        if key not in self._store:
            file = self._cached_file(ex) if self.cache_dir else None
            if file is not None and file.is_file():
                feats = load_file(str(file))["features"]
            else:
                param = next(self.encoder.parameters())
                feats = self.encoder(self.mel(ex).to(param.device)).float().cpu()
                if file is not None:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(file, lambda tmp: save_file({"features": feats.contiguous()}, tmp))
            if not self.cache:
                return feats
            self._store[key] = feats
        return self._store[key]

    def precompute(self, examples: list[Example], progress: bool = False, rank: int = 0, world: int = 1) -> None:
        """Encode the examples' distinct clips ahead of training. With a cache_dir, process `rank` of
        `world` encodes only its share into it: over processes that share the folder each clip is
        encoded once (call a barrier before reading); a process whose folder lacks a clip another
        one encoded encodes it when it first needs it."""
        from tqdm import tqdm

        todo = [ex for ex in distinct_clips(examples) if str(ex.audio) not in self._store]
        if self.cache_dir is not None:
            todo = [ex for ex in todo[rank::world] if not self._cached_file(ex).is_file()]
        for ex in tqdm(todo, desc="encoding audio", disable=not progress or not todo):
            self.features(ex)

    def _cached_file(self, ex: Example) -> Path:
        return self.cache_dir / f"{_audio_key(ex.audio)}.safetensors"


def collate(
    examples: list[Example],
    tokenizer,
    source: FeatureSource,
    *,
    with_answer: bool = True,
    left_pad: bool = False,
    use_text_question: bool = False,
) -> Batch:
    """Examples -> Batch. with_answer: prompt + answer with labels (training); else prompts only,
    left-padded for generation. use_text_question: the question as text, no audio (modality gap)."""
    seqs, labels = [], []
    for ex in examples:
        frames = 0 if use_text_question else ex.num_frames
        question = (ex.text or ex.question) if use_text_question else ex.question
        # The text question replaces the audio, and so whatever stands for it (a context).
        p = prompt_ids(tokenizer, frames, question, "" if frames or use_text_question else ex.context)
        a = answer_ids(tokenizer, ex.answer) if with_answer else []
        seqs.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), IGNORE, dtype=torch.long)
    attn = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        sl = slice(L - len(s), L) if left_pad else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        lab[b, sl] = torch.tensor(y)
        attn[b, sl] = 1
    categories = [category_index(ex.category) for ex in examples]
    batch = Batch(ids, attn, lab if with_answer else None, category_B=torch.tensor(categories, dtype=torch.long))
    if use_text_question or all(ex.audio is None for ex in examples):
        return batch
    if source.encoder is not None:
        dim = source.encoder.stacked_dim
        feats = [source.features(ex) if ex.audio is not None else torch.zeros(0, dim) for ex in examples]
        batch.audio_BFC, batch.audio_mask_BF = pad_frames(feats, dim, "cpu")
    else:  # the encoder runs inside the model's forward (it is being trained)
        batch.mels = [source.mel(ex) if ex.audio is not None else None for ex in examples]
    return batch


def length_batches(
    examples: list[Example], tokenizer, *, max_batch_tokens: int, max_batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Indices grouped into batches of similar length, at most `max_batch_tokens` padded positions
    (prompt + answer) and `max_batch_size` examples each; order fixed by (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    sizes = [
        len(prompt_ids(tokenizer, ex.num_frames, ex.question, ex.context)) + len(answer_ids(tokenizer, ex.answer))
        for ex in examples
    ]
    order = list(range(len(examples)))
    rng.shuffle(order)
    bucket = max(1, 50 * max_batch_size)  # sort inside buckets: similar lengths, still random overall
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: sizes[i])
        cur: list[int] = []
        for i in chunk:
            longest = max([sizes[j] for j in cur] + [sizes[i]])
            if cur and (len(cur) + 1 > max_batch_size or longest * (len(cur) + 1) > max_batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


@dataclass
class DataPosition:
    """Where training is in the data: resumable exactly."""

    epoch: int = 0
    batch: int = 0  # index into the epoch's batch list of the next global step's first batch


class BatchStream:
    """Endless global steps of `per_step` batches each (grad accumulation x ranks), epoch after
    epoch; each rank reads its share. The stream's position is part of every checkpoint."""

    def __init__(
        self,
        examples,
        tokenizer,
        *,
        max_batch_tokens,
        max_batch_size,
        seed,
        per_step: int,
        rank: int = 0,
        world: int = 1,
        position: DataPosition | None = None,
    ) -> None:
        if per_step % world:
            raise ValueError(f"per_step={per_step} batches per step must be divisible by world={world}")
        self.examples, self.tokenizer = examples, tokenizer
        self.kw = dict(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, seed=seed)
        self.per_step, self.rank, self.world = per_step, rank, world
        self.position = position or DataPosition()
        self._epoch_batches: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, length_batches(self.examples, self.tokenizer, epoch=epoch, **self.kw))
        return self._epoch_batches[1]

    def next_step(self) -> list[list[Example]]:
        """This rank's micro-batches of the next global step (the tail of an epoch is dropped)."""
        batches = self._batches(self.position.epoch)
        if len(batches) < self.per_step:
            raise ValueError(f"an epoch has {len(batches)} batches, fewer than the {self.per_step} one step needs")
        if self.position.batch + self.per_step > len(batches):
            self.position = DataPosition(self.position.epoch + 1, 0)
            batches = self._batches(self.position.epoch)
        step = batches[self.position.batch : self.position.batch + self.per_step]
        self.position = DataPosition(self.position.epoch, self.position.batch + self.per_step)
        mine = step[self.rank :: self.world]
        return [[self.examples[i] for i in b] for b in mine]

    def __iter__(self) -> Iterator[list[list[Example]]]:
        while True:
            yield self.next_step()
