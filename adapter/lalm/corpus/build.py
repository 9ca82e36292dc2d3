"""A heterogeneous audio corpus: speech, music and environmental sound, each with several tasks,
generated offline, reproducible from a seed and cached on disk.

    category  task           question (choices)                                    eval
    speech    transcription  which two words are spoken (4 phrases)                mmau
    speech    gender         male / female                                         mmau
    speech    rate           slow / normal / fast                                  mmau
    speech    voice pitch    high / low                                            mmau
    speech    word count     how many words are spoken: 1 / 2 / 3 / 4 / 5          mmau
    speech    knowledge      a spoken 4-option question; answer with its letter    voicebench
    speech    dictation      the spoken sentence, word for word (train/val only)   -
    music     mode           major / minor                                         mmau
    music     instrument     sine / square / sawtooth / plucked string             mmau
    music     direction      ascending / descending                                mmau
    music     note count     2 / 3 / 4 / 5 / 6                                     mmau
    music     tempo          slow / normal / fast                                  mmau
    music     music pitch    high / low (melody register)                          mmau
    sound     which sound    rain / wind / siren / alarm / knocking / engine       mmau
    sound     knock count    1 / 2 / 3 / 4 / 5                                     mmau
    sound     knock pace     slow / normal / fast                                  mmau
    sound     sound pitch    high / low (a beeping tone)                           mmau
    sound     background     which sound is under the speech (same six)            mmau

Three questions are asked of all three categories with the same answer words (SHARED_ANSWERS:
"high or low", "slow, normal or fast", "how many"): one adapter must map different cues (a
voice's pitch against its own range, a melody's register, a beep's frequency) to the same words,
where categories can pull an adapter's weights in different directions. The content tasks
(what is said, who says it, which instrument, which sound) are what a pretrained encoder carries.

Every item also has a `caption`: its answer (or what is said) in a few words, the text an audio
clip stands for ("low voice", "3 knocks", the spoken question). The frozen-backbone setting
(adapter/lalm/studies/backbone.py) trains the LLM on captions in place of audio before the adapter learns
to stand in for them.

Splits never share a sentence, a question or a seed: sentences and questions are assigned to a
split by a hash of their text, and every synthetic item draws from its own (seed, split, task,
index) RNG. `text.jsonl` holds every knowledge question as plain text (the backbone's "text
knowledge", trained on by both adapters alike: a small random LLM knows nothing else); the test
split's spoken knowledge questions, never heard in training, are then answered once as text and
once as audio to measure the modality gap (paper Table 1).
"""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from adapter.files import atomic_write_text
from adapter.lalm.audio import load_audio
from adapter.lalm.corpus import music, sounds, speech
from adapter.lalm.corpus.banks import NOUNS, phrase_bank, question_bank, sentence_bank
from adapter.lalm.data import write_manifest

VERSION = 8  # 8: transcription distractors from the item's own split; test voices held out
QUESTIONS = 100  # distinct knowledge questions: few enough that the small LLM learns them all as text
SPLITS = ("train", "val", "test")
SPLIT_FRACTION = {"train": 0.8, "val": 0.1, "test": 0.1}
VOICEBENCH_INSTRUCTION = "Answer with the letter of the correct option (A, B, C or D)."
COUNTS = ["1", "2", "3", "4", "5"]
TASKS = {  # task -> (category, question, choices or None when item-specific, caption of the answer)
    "transcription": ("speech", "Which words are spoken?", None, "{}"),
    "gender": ("speech", "Is the speaker male or female?", ["male", "female"], "{} voice"),
    "rate": ("speech", "Is the speaker talking slowly, at a normal pace or fast?", list(speech.RATES), "{} speech"),
    "voice pitch": ("speech", "Is the voice high or low?", ["high", "low"], "{} voice"),
    "word count": ("speech", "How many words are spoken?", COUNTS, "{} words"),
    "knowledge": ("speech", f"Listen to the question. {VOICEBENCH_INSTRUCTION}", ["A", "B", "C", "D"], "{}"),
    "dictation": ("speech", "What is said?", [], "{}"),
    "mode": ("music", "Is the chord major or minor?", ["major", "minor"], "{} chord"),
    "instrument": ("music", "Which instrument plays?", list(music.TIMBRES), "{} melody"),
    "direction": ("music", "Does the melody go up or down?", ["ascending", "descending"], "{} melody"),
    "note count": ("music", "How many notes are played?", [str(n) for n in music.NOTE_COUNTS], "{} notes"),
    "tempo": ("music", "Is the tempo slow, normal or fast?", list(music.TEMPO), "{} tempo"),
    "music pitch": ("music", "Is the melody high or low?", list(music.REGISTERS), "{} melody"),
    "which sound": ("sound", "Which sound is this?", list(sounds.SOUNDS), "{} sound"),
    "knock count": ("sound", "How many knocks are there?", [str(n) for n in sounds.KNOCK_COUNTS], "{} knocks"),
    "knock pace": ("sound", "Are the knocks slow, normal or fast?", list(sounds.KNOCK_PACE), "{} knocks"),
    "sound pitch": ("sound", "Is the sound high or low?", list(sounds.BEEP_PITCH), "{} beeping"),
    "background": ("sound", "Which sound is in the background of the speech?", list(sounds.SOUNDS), "speech over {}"),
}
SHARED_ANSWERS = {  # questions asked of more than one category with the same answer words
    "high or low": ("voice pitch", "music pitch", "sound pitch"),
    "slow, normal or fast": ("rate", "tempo", "knock pace"),
    "how many": ("word count", "note count", "knock count"),
}
TRAIN_ONLY = ("dictation",)
"""Tasks with no test items: dictation (say the spoken sentence back) aligns speech with the text
the LLM reads (spoken questions must be read before they can be answered); it has no options to
score."""
MUSIC_GENERATORS = {
    "mode": music.chord_mode,
    "instrument": music.instrument,
    "direction": music.direction,
    "note count": music.note_count,
    "tempo": music.tempo,
    "music pitch": music.register,
}
SOUND_GENERATORS = {
    "which sound": sounds.which_sound,
    "knock count": sounds.knock_count,
    "knock pace": sounds.knock_pace,
    "sound pitch": sounds.beep_pitch,
}


@dataclass(kw_only=True)
class CorpusConfig:
    """Items per task in each split, and the seed everything is drawn from.

    questions: distinct knowledge questions. Up to QUESTIONS (100) they come from the narrow bank
    and a spoken-knowledge item draws its split's question at random (the default corpus); with
    more, from the wide bank (banks.question_bank, ~1,200 possible), and the spoken-knowledge
    items of a split take its questions in turn, each once before any repeats. knowledge_test: the
    test split's spoken-knowledge items (0: test_per_task); with questions=1000 (about 100 test
    questions per seed) and knowledge_test=100, three seeds give ~300 distinct held-out questions:
    a standard error of at most 2.9 points on their accuracy.
    """

    train_per_task: int = 150
    val_per_task: int = 15
    test_per_task: int = 30
    seed: int = 0
    questions: int = QUESTIONS
    knowledge_test: int = 0

    def __post_init__(self) -> None:
        if min(self.train_per_task, self.val_per_task, self.test_per_task) < 1:
            raise ValueError(f"every split needs at least one item per task, got {asdict(self)}")
        if self.questions < 10 or self.knowledge_test < 0:
            raise ValueError(
                f"questions must be >= 10 and knowledge_test >= 0, got {self.questions}, {self.knowledge_test}"
            )

    @property
    def wide_bank(self) -> bool:
        return self.questions > QUESTIONS

    def per_task(self, split: str, task: str = "") -> int:
        if split == "test" and task in TRAIN_ONLY:
            return 0
        if split == "test" and task == "knowledge" and self.knowledge_test:
            return self.knowledge_test
        return {"train": self.train_per_task, "val": self.val_per_task, "test": self.test_per_task}[split]


SIZES = {
    "ci": CorpusConfig(train_per_task=8, val_per_task=2, test_per_task=3),
    "demo": CorpusConfig(train_per_task=150, val_per_task=10, test_per_task=25),
    "full": CorpusConfig(train_per_task=2500, val_per_task=100, test_per_task=250),
}


def split_of(text: str, seed: int) -> str:
    """train / val / test by a stable hash of the text: one split per sentence or question."""
    h = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if h < SPLIT_FRACTION["train"] else ("val" if h < 0.9 else "test")


def _rng(cfg: CorpusConfig, split: str, task: str, index: int) -> tuple[random.Random, np.random.Generator]:
    key = int(hashlib.sha256(f"{cfg.seed}|{split}|{task}|{index}".encode()).hexdigest()[:16], 16)
    return random.Random(key), np.random.default_rng(key)


def _mc_question(question: str, choices: list[str]) -> str:
    return f"{question} Choices: {'; '.join(c.rstrip('.') for c in choices)}."


class _Builder:
    def __init__(self, root: Path, cfg: CorpusConfig, workers: int) -> None:
        self.root, self.cfg, self.workers = root, cfg, workers
        self.audio_dir = root / "audio"
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        n_sent = 4 * sum(cfg.per_task(s) for s in SPLITS) + 60
        sentences = sentence_bank(max(n_sent, 200), seed=cfg.seed)
        self.sentences = {s: [x for x in sentences if split_of(x, cfg.seed) == s] for s in SPLITS}
        phrases = phrase_bank()
        self.phrases = {s: [x for x in phrases if split_of(x, cfg.seed) == s] for s in SPLITS}
        questions = question_bank(cfg.questions, seed=cfg.seed, wide=cfg.wide_bank)
        self.questions = {s: [q for q in questions if split_of(q.question, cfg.seed) == s] for s in SPLITS}
        self.all_questions = questions

    def _write(self, name: str, samples: np.ndarray, sr: int = 16000, fmt: str = "wav") -> str:
        path = self.audio_dir / f"{name}.{fmt}"
        sf.write(path, samples, sr, subtype="PCM_16")
        return str(path.relative_to(self.root))

    def speech_item(self, split: str, task: str, i: int) -> dict:
        rng, nrng = _rng(self.cfg, split, task, i)
        name = f"{split}-{task.replace(' ', '_')}-{i:06d}"
        gender = ["male", "female"][i % 2] if task == "gender" else None
        rate = list(speech.RATES)[i % 3] if task == "rate" else None
        pitch = list(speech.PITCH_CLASSES)[i % 2] if task == "voice pitch" else None
        voice = speech.random_voice(rng, gender=gender, rate=rate, pitch=pitch, held_out=split == "test")
        choices = TASKS[task][2]
        text = ""
        if task == "knowledge":
            pool = self.questions[split]
            q = pool[i % len(pool)] if self.cfg.wide_bank else rng.choice(pool)
            said, answer, text = q.spoken(), q.letter, f"{q.spoken()} {VOICEBENCH_INSTRUCTION}"
        elif task == "transcription":
            pool = self.phrases[split]
            said = rng.choice(pool)
            adj, noun = said.split()
            # Distractors from the item's own split (issue 40: drawn from every split, a test item's
            # distractors had mostly been answers in training and its right phrase never had); those
            # sharing a word with the answer first (both words must be heard), then any.
            near = [p for p in pool if p != said and (p.split()[0] == adj or p.split()[1] == noun)]
            picked = rng.sample(near, min(3, len(near)))
            others = [p for p in pool if p != said and p not in picked]
            choices = [said, *picked, *rng.sample(others, 3 - len(picked))]
            rng.shuffle(choices)
            answer = said
        elif task == "word count":
            answer = COUNTS[i % len(COUNTS)]
            said = ", ".join(rng.sample(NOUNS, int(answer))) + "."
        else:
            said = rng.choice(self.sentences[split])
            by_task = {"gender": voice.gender, "rate": voice.rate_class, "voice pitch": pitch, "dictation": said}
            answer = by_task.get(task)
        wav = self.audio_dir / f"{name}.wav"
        speech.synthesize(said, voice, wav)
        audio = str(wav.relative_to(self.root))
        if task == "background":
            bg, answer = sounds.which_sound(nrng)
            mixed = sounds.mix_under(load_audio(wav), bg, nrng)
            wav.unlink()
            audio = self._write(name, mixed)
        question = TASKS[task][1] if task in ("knowledge", "dictation") else _mc_question(TASKS[task][1], choices)
        return {
            "id": name,
            "audio": audio,
            "category": TASKS[task][0],
            "task": task,
            "question": question,
            "choices": choices,
            "answer": answer,
            "text": text,
            "spoken": said,
            "caption": TASKS[task][3].format(said if task in ("knowledge", "dictation") else answer),
            "eval": "voicebench" if task == "knowledge" else "mmau",
            "voice": asdict(voice),
        }

    def synthetic_item(self, split: str, task: str, i: int) -> dict:
        _, nrng = _rng(self.cfg, split, task, i)
        name = f"{split}-{task.replace(' ', '_')}-{i:06d}"
        gen = MUSIC_GENERATORS.get(task) or SOUND_GENERATORS[task]
        samples, answer = gen(nrng)
        audio = self._write(name, samples, fmt="flac" if task in MUSIC_GENERATORS else "wav")
        choices = TASKS[task][2]
        return {
            "id": name,
            "audio": audio,
            "category": TASKS[task][0],
            "task": task,
            "question": _mc_question(TASKS[task][1], choices),
            "choices": choices,
            "answer": answer,
            "caption": TASKS[task][3].format(answer),
            "eval": "mmau",
        }

    def split_items(self, split: str, progress) -> list[dict]:
        jobs = []
        for task in TASKS:
            for i in range(self.cfg.per_task(split, task)):
                is_speech = TASKS[task][0] == "speech" or task == "background"
                jobs.append((self.speech_item if is_speech else self.synthetic_item, split, task, i))
        with ThreadPoolExecutor(self.workers) as pool:  # espeak-ng runs as subprocesses: threads suffice
            items = list(progress(pool.map(lambda j: j[0](*j[1:]), jobs), total=len(jobs), desc=f"corpus {split}"))
        return items

    def text_items(self) -> list[dict]:
        return [
            {
                "id": f"text-{k:05d}",
                "audio": None,
                "category": "text",
                "task": "knowledge",
                "question": f"{q.spoken()} {VOICEBENCH_INSTRUCTION}",
                "choices": ["A", "B", "C", "D"],
                "answer": q.letter,
                "eval": "voicebench",
            }
            for k, q in enumerate(self.all_questions)
        ]


def _same_build(stored: dict, meta: dict) -> bool:
    """Whether a corpus.json describes the build `meta` asks for; a config field the stored one
    lacks was added later, and that corpus was built with its default."""
    if not isinstance(stored, dict) or stored.get("version") != meta["version"]:
        return False
    return {**asdict(CorpusConfig()), **(stored.get("config") or {})} == meta["config"]


def build_corpus(
    root: str | Path, cfg: CorpusConfig, *, workers: int = 4, progress: bool = True, force: bool = False
) -> dict[str, Path]:
    """Generate (or reuse, when the same config was built before) the corpus under `root`.
    Returns the manifests {"train", "val", "test", "text"}."""
    from tqdm import tqdm

    root = Path(root)
    manifests = {name: root / f"{name}.jsonl" for name in (*SPLITS, "text")}
    meta_path = root / "corpus.json"
    meta = {"version": VERSION, "config": asdict(cfg)}
    if (
        not force
        and meta_path.is_file()
        and _same_build(json.loads(meta_path.read_text()), meta)
        and all(p.is_file() for p in manifests.values())
    ):
        return manifests
    if not speech.espeak_available():
        raise speech.SpeechSynthesisError("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh)")
    meta_path.unlink(missing_ok=True)  # an interrupted build is rebuilt, never half-reused
    builder = _Builder(root, cfg, workers)
    bar = lambda it, total, desc: tqdm(it, total=total, desc=desc, disable=not progress)  # noqa: E731
    for split in SPLITS:
        write_manifest(manifests[split], builder.split_items(split, bar))
    write_manifest(manifests["text"], builder.text_items())
    atomic_write_text(meta_path, json.dumps(meta))
    return manifests
