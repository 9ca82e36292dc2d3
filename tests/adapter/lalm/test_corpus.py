"""The corpus generators label what they generate: each label is checked against a measurement
of the audio itself (pitch classes, pitch trajectories, onsets, harmonics, spectra, F0, duration)."""

import dataclasses
import json
import random

import numpy as np
import pytest

from adapter.lalm.audio import load_audio
from adapter.lalm.corpus import build as corpus_build
from adapter.lalm.corpus import music, sounds, speech
from adapter.lalm.corpus.banks import phrase_bank, question_bank, sentence_bank
from adapter.lalm.corpus.build import SPLITS, TASKS, CorpusConfig, build_corpus

SR = 16000
N = 24  # seeded samples per generator


def spectrum(x):
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return mag, np.fft.rfftfreq(len(x), 1 / SR)


def peak_notes(x, rel=0.3):
    """MIDI numbers of the spectral peaks above rel x the largest (local maxima only)."""
    mag, freq = spectrum(x)
    keep = (mag[1:-1] > rel * mag.max()) & (mag[1:-1] >= mag[:-2]) & (mag[1:-1] >= mag[2:])
    f = freq[1:-1][keep]
    return sorted({int(round(69 + 12 * np.log2(v / 440))) for v in f if v > 60})


def onsets(x, frame=0.01, thresh=0.2):
    """Number of rises of the frame RMS through `thresh` x its maximum."""
    n = int(frame * SR)
    rms = np.sqrt(np.convolve(x**2, np.ones(n) / n, "same"))[::n]
    above = rms > thresh * rms.max()
    return int(np.sum(above[1:] & ~above[:-1]) + above[0])


def salient_notes(x, count=3):
    """The `count` most salient pitch classes: each candidate note (MIDI 40-90) scores the spectrum
    at its first five harmonics weighted 1/k, so a note's overtones vote for it, not for others."""
    mag, freq = spectrum(x)
    score = {}
    for m in range(40, 91):
        f = 440 * 2 ** ((m - 69) / 12)
        score[m] = sum(mag[np.argmin(np.abs(freq - k * f))] / k for k in range(1, 6))
    classes: dict[int, float] = {}
    for m, v in score.items():  # a note's class takes its best octave
        classes[(m - 69) % 12] = max(classes.get((m - 69) % 12, 0), v)
    return set(sorted(classes, key=classes.get)[-count:])


def triad_quality(x) -> str:
    """major / minor from the three most salient pitch classes (a root r with r+4 or r+3, and r+7)."""
    top = salient_notes(x)
    for r in top:
        if {(r + 4) % 12, (r + 7) % 12} <= top:
            return "major"
        if {(r + 3) % 12, (r + 7) % 12} <= top:
            return "minor"
    return "neither"


def test_major_chords_are_major_and_minor_minor():
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(2 * N):
        x, label = music.chord_mode(rng)
        assert triad_quality(x) == label
        labels.append(label)
    assert set(labels) == {"major", "minor"}


@pytest.mark.parametrize("note", [50, 62, 74, 86])
@pytest.mark.parametrize("timbre", music.TIMBRES)
def test_notes_are_in_tune(note, timbre):
    """Every timbre sounds at its note within 10 cents (the strongest of its lowest two harmonics)."""
    f = music.midi_hz(note)
    mag, freq = spectrum(music.tone(f, 1.0, timbre, np.random.default_rng(0)))
    peak = freq[np.argmax(np.where(freq < 2.5 * f, mag, 0))]
    harmonic = round(peak / f)
    assert abs(1200 * np.log2(peak / (harmonic * f))) < 10, (peak, f)


def pitch(seg) -> int:
    """MIDI note of a harmonic segment by autocorrelation: past the first zero crossing, the
    shortest-lag peak within 85% of the best, so neither a slow sine nor a strong harmonic fools it."""
    seg = seg - seg.mean()
    ac = np.correlate(seg, seg, "full")[len(seg) - 1 :]
    start = int(np.flatnonzero(ac < 0)[0])
    hi = min(len(ac) - 1, int(SR / 60))
    peaks = [i for i in range(start + 1, hi) if ac[i] >= ac[i - 1] and ac[i] >= ac[i + 1]]
    best = max(ac[i] for i in peaks)
    lag = next(i for i in peaks if ac[i] >= 0.85 * best)
    return int(round(69 + 12 * np.log2(SR / lag / 440)))


def test_direction_labels_follow_the_pitch():
    rng = np.random.default_rng(1)
    for _ in range(N):
        x, label = music.direction(rng)
        seg = int(0.22 * SR)
        notes = [pitch(x[i + seg // 4 : i + 3 * seg // 4]) for i in range(0, len(x) - seg + 1, seg)]
        steps = np.diff(notes)
        assert (steps > 0).all() if label == "ascending" else (steps < 0).all(), (label, notes)


def envelope(x, frame=0.01):
    n = int(frame * SR)
    return np.sqrt(np.convolve(x**2, np.ones(n) / n, "same"))[::n]


def test_note_counts_and_tempi_match_the_audio():
    rng = np.random.default_rng(2)
    for _ in range(N):
        x, label = music.note_count(rng)
        assert onsets(x) == int(label), label
    for _ in range(N):
        x, label = music.tempo(rng)
        env = envelope(x) - envelope(x).mean()
        ac = np.correlate(env, env, "full")[len(env) - 1 :]
        lo, hi = 30, 110  # beat period between 0.3 and 1.1 s, in 10 ms frames
        beat = (lo + int(np.argmax(ac[lo:hi]))) * 0.01
        bpm_lo, bpm_hi = music.TEMPO[label]
        assert 60 / bpm_hi - 0.02 <= beat <= 60 / bpm_lo + 0.02, (label, beat)


@pytest.mark.parametrize("timbre", music.TIMBRES)
def test_timbres_have_their_harmonics(timbre):
    f0 = 220.0
    x = music.tone(f0, 0.5, timbre, np.random.default_rng(0))
    mag, freq = spectrum(x)
    h = [mag[np.argmin(np.abs(freq - k * f0))] for k in (1, 2, 3)]
    if timbre == "sine":
        assert h[1] < 0.01 * h[0] and h[2] < 0.01 * h[0]
    elif timbre == "square":
        assert h[1] < 0.05 * h[0] and 0.2 < h[2] / h[0] < 0.5  # odd harmonics at 1/k
    elif timbre == "sawtooth":
        assert 0.35 < h[1] / h[0] < 0.65 and 0.2 < h[2] / h[0] < 0.45  # every harmonic at 1/k
    else:  # plucked string: harmonic, with overtones
        assert h[1] > 0.02 * h[0] and h[0] == max(h)


def test_sound_labels_match_their_signatures():
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(60):
        x, label = sounds.which_sound(rng)
        seen.add(label)
        mag, freq = spectrum(x)
        energy = mag**2
        low = energy[freq < 400].sum() / energy.sum()
        high = energy[freq > 2000].sum() / energy.sum()
        frames = [x[i : i + 2048] for i in range(0, len(x) - 2048, 2048)]
        dominant = [spectrum(f)[1][np.argmax(spectrum(f)[0])] for f in frames]
        if label == "engine":
            assert low > 0.8
        elif label == "wind":
            assert low + energy[(freq >= 400) & (freq < 1000)].sum() / energy.sum() > 0.9 and high < 0.05
        elif label == "rain":
            assert high > 0.2
        elif label == "siren":
            assert 500 < np.median(dominant) < 1600 and np.ptp(dominant) > 250  # a sweeping tone
        elif label == "alarm":
            assert np.median(dominant) > 1800 and onsets(x) >= 2  # beeps
        else:
            assert label == "knocking" and 1 <= onsets(x) <= 5
    assert seen == set(sounds.SOUNDS)


def test_knock_counts():
    rng = np.random.default_rng(4)
    for _ in range(N):
        x, label = sounds.knock_count(rng)
        assert onsets(x, thresh=0.3) == int(label)


def test_knock_paces_and_beep_pitches_match_the_audio():
    rng = np.random.default_rng(6)
    for _ in range(N):
        x, label = sounds.knock_pace(rng)
        env = envelope(x)
        rises = np.flatnonzero((env[1:] > 0.3 * env.max()) & (env[:-1] <= 0.3 * env.max())) * 0.01
        lo, hi = sounds.KNOCK_PACE[label]
        assert lo - 0.02 <= np.median(np.diff(rises)) <= hi + 0.02, (label, np.diff(rises))
    seen = set()
    for _ in range(N):
        x, label = sounds.beep_pitch(rng)
        seen.add(label)
        mag, freq = spectrum(x)
        lo, hi = sounds.BEEP_PITCH[label]
        assert lo * 0.98 <= freq[np.argmax(mag)] <= hi * 1.02, (label, freq[np.argmax(mag)])
    assert seen == {"low", "high"}


def test_melody_registers_match_their_labels():
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(N):
        x, label = music.register(rng)
        seen.add(label)
        seg = int(0.3 * SR)
        notes = [pitch(x[i + seg // 4 : i + 3 * seg // 4]) for i in range(0, len(x) - seg + 1, seg)]
        lo, hi = music.REGISTERS[label]
        assert all(lo <= n <= hi for n in notes), (label, notes)
    assert seen == {"low", "high"}


def test_mixing_keeps_the_speech_length_and_level():
    rng = np.random.default_rng(5)
    s = np.sin(np.linspace(0, 200, 16000)).astype(np.float32)
    bg, _ = sounds.which_sound(rng)
    mix = sounds.mix_under(s, bg, rng)
    assert mix.shape == s.shape and np.abs(mix).max() == pytest.approx(0.9, rel=1e-4)


def test_espeak_voices_match_their_gender_and_rate_labels(tmp_path):
    rng = random.Random(0)
    f0 = {"male": [], "female": []}
    durations = {r: [] for r in speech.RATES}
    text = "The quiet farmer helps the young teacher near the house."
    for i in range(24):
        voice = speech.random_voice(rng, gender=["male", "female"][i % 2], rate=list(speech.RATES)[i % 3])
        path = speech.synthesize(text, voice, tmp_path / f"v{i}.wav")
        x = load_audio(path)
        f0[voice.gender].append(speech.median_f0(x, SR))
        durations[voice.rate_class].append(len(x) / SR)
    assert max(f0["male"]) < 135 < min(f0["female"]), f0
    assert min(durations["slow"]) > max(durations["normal"]) and min(durations["normal"]) > max(durations["fast"])


def test_voice_pitch_classes_are_high_and_low_within_each_gender(tmp_path):
    """The voice-pitch task's label holds within each gender (a low female voice may sit above a
    high male one: the task asks about the voice's own range)."""
    rng = random.Random(1)
    f0 = {}
    for i in range(16):
        gender, cls = ["male", "female"][i % 2], list(speech.PITCH_CLASSES)[(i // 2) % 2]
        voice = speech.random_voice(rng, gender=gender, pitch=cls)
        path = speech.synthesize("The old painter visits the river.", voice, tmp_path / f"p{i}.wav")
        f0.setdefault((gender, cls), []).append(speech.median_f0(load_audio(path), SR))
    for gender in ("male", "female"):
        assert max(f0[gender, "low"]) < min(f0[gender, "high"]), f0


def test_banks_are_distinct_and_deterministic():
    assert len(set(phrase_bank())) == 400
    assert sentence_bank(50, 1) == sentence_bank(50, 1) and len(set(sentence_bank(50, 1))) == 50
    qs = question_bank(100, 0)
    assert len({q.question for q in qs}) == 100 and qs == question_bank(100, 0)
    assert all(len(q.choices) == 4 and len(set(q.choices)) == 4 for q in qs)
    assert {q.letter for q in qs} == {"A", "B", "C", "D"}


@pytest.fixture(scope="module")
def built(ci_corpus):
    """(root, manifests) of the session's CI-size corpus (tests/adapter/lalm/conftest.py)."""
    return ci_corpus, build_corpus(ci_corpus, corpus_build.SIZES["ci"], progress=False)


def test_corpus_splits_share_no_text_or_seed(built):
    root, manifests = built
    recs = {s: [json.loads(line) for line in manifests[s].read_text().splitlines()] for s in SPLITS}
    cfg = corpus_build.SIZES["ci"]
    for s in SPLITS:
        assert len(recs[s]) == sum(cfg.per_task(s, t) for t in TASKS)
        for r in recs[s]:
            assert (root / r["audio"]).is_file() and r["category"] in ("speech", "music", "sound")
            assert r["caption"] and (r["answer"] in r["choices"] or r["task"] in corpus_build.TRAIN_ONLY)
            if r["task"] not in ("knowledge", "dictation", "transcription"):
                assert r["caption"].startswith(r["answer"]) or r["caption"].endswith(r["answer"]), r
    assert not [r for r in recs["test"] if r["task"] in corpus_build.TRAIN_ONLY]
    dictation = [r for r in recs["train"] if r["task"] == "dictation"]
    assert dictation and all(r["answer"] == r["spoken"] == r["caption"] for r in dictation)
    counts = [r for r in recs["train"] if r["task"] == "word count"]
    assert all(len(r["spoken"].split(", ")) == int(r["answer"]) for r in counts)
    # Sentences, phrases and questions never cross splits (word-count lists, a few nouns, may:
    # only their number is asked).
    spoken = {s: {r["spoken"] for r in recs[s] if r.get("spoken") and r["task"] != "word count"} for s in SPLITS}
    assert not (spoken["train"] & spoken["test"]) and not (spoken["train"] & spoken["val"])
    assert not (spoken["val"] & spoken["test"])
    ids = [r["id"] for s in SPLITS for r in recs[s]]
    assert len(ids) == len(set(ids))
    text = [json.loads(line) for line in manifests["text"].read_text().splitlines()]
    assert len(text) == corpus_build.QUESTIONS and all(r["audio"] is None for r in text)
    # every spoken test question is known as text (the backbone's knowledge)
    known = {r["question"].rsplit(" Answer with", 1)[0] for r in text}
    assert all(r["spoken"] in known for r in recs["test"] if r["task"] == "knowledge")


def test_corpus_is_cached_and_reproducible(built, tmp_path):
    root, manifests = built
    before = {p: p.stat().st_mtime_ns for p in manifests.values()}
    assert build_corpus(root, corpus_build.SIZES["ci"], progress=False) == manifests
    assert {p: p.stat().st_mtime_ns for p in manifests.values()} == before  # reused, not rebuilt
    again = build_corpus(tmp_path, corpus_build.SIZES["ci"], progress=False)
    assert again["test"].read_text() == manifests["test"].read_text()  # same seed, same corpus
    with pytest.raises(ValueError, match="at least one item per task"):
        CorpusConfig(train_per_task=0)


def test_wide_question_bank_and_held_out_knowledge_items(tmp_path):
    """The default bank is the narrow one (operands <= 10, larger / faster only); the wide bank
    holds 1,000 distinct questions; a wide corpus's test spoken-knowledge items ask distinct
    held-out questions in turn; a corpus.json written before a config field existed still matches
    a build with that field's default."""
    narrow = question_bank(100, 0)
    assert not any(w in q.question for q in narrow for w in ("smaller", "slower", "eleven", "twenty "))
    wide = question_bank(1000, 0, wide=True)
    assert len({q.question for q in wide}) == 1000 and any("smaller" in q.question for q in wide)
    cfg = CorpusConfig(train_per_task=2, val_per_task=1, test_per_task=1, questions=300, knowledge_test=6)
    assert cfg.per_task("test", "knowledge") == 6 and cfg.per_task("test", "gender") == 1
    manifests = build_corpus(tmp_path / "wide", cfg, progress=False)
    test = [json.loads(x) for x in manifests["test"].read_text().splitlines()]
    asked = [r["spoken"] for r in test if r["task"] == "knowledge"]
    assert len(asked) == 6 and len(set(asked)) == 6
    text = [json.loads(x) for x in manifests["text"].read_text().splitlines()]
    assert len(text) == 300 and set(asked) <= {r["question"].rsplit(" Answer with", 1)[0] for r in text}
    meta = json.loads((tmp_path / "wide" / "corpus.json").read_text())
    old = {"version": meta["version"], "config": {k: v for k, v in meta["config"].items() if k != "knowledge_test"}}
    assert not corpus_build._same_build(old, meta)  # knowledge_test=6 is not the default
    default = {"version": meta["version"], "config": dataclasses.asdict(CorpusConfig())}
    before = {"train_per_task": 150, "val_per_task": 15, "test_per_task": 30, "seed": 0}  # a v7 corpus.json
    legacy = {"version": meta["version"], "config": before}
    assert corpus_build._same_build(legacy, default)
    assert not corpus_build._same_build({**legacy, "version": 6}, default)
    with pytest.raises(ValueError, match="questions must be >= 10"):
        CorpusConfig(questions=5)


def test_test_voices_are_never_heard_in_training_and_distractors_share_the_split(built):
    """Issue 40 item 4 (corpus version 8): the 48 espeak voices were shared by every split (gender and
    pitch tested on seen speakers), and transcription distractors came from every split (a test
    item's right phrase had never been an answer in training, its distractors mostly had)."""
    root, manifests = built
    recs = {s: [json.loads(line) for line in manifests[s].read_text().splitlines()] for s in SPLITS}
    held = {v for vs in speech.TEST_VARIANTS.values() for v in vs}
    spoken = {s: [r for r in recs[s] if "voice" in r] for s in SPLITS}
    assert spoken["test"] and all(r["voice"]["variant"] in held for r in spoken["test"])
    assert all(r["voice"]["variant"] not in held for s in ("train", "val") for r in spoken[s])
    seed = corpus_build.SIZES["ci"].seed
    for s in SPLITS:
        for r in recs[s]:
            if r["task"] == "transcription":
                assert {corpus_build.split_of(c, seed) for c in r["choices"]} == {s}, r["choices"]
                assert len(set(r["choices"])) == 4 and r["answer"] in r["choices"]
