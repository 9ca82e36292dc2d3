"""Evaluate a trained LALM the way the paper's benchmarks score (section 4.1, Table 1).

- MMAU style (speech / sound / music multiple choice): the generated answer is right when every
  word of the right choice is in it and no word that only a wrong choice has.
- VoiceBench MMSU / OBQA style (spoken 4-option questions): a letter is parsed from the answer with
  a list of patterns; an answer with no (or an ambiguous) letter gets a seeded random letter and
  counts in the fail rate.
- Modality gap: the same test questions given as text (the backbone's setting) and as audio;
  gap = audio accuracy - text accuracy (negative: audio is worse).
- Log-likelihood scoring (`mmau_ll`, `voicebench.*_ll`), beside the generated answers: every
  option of a question is scored by the summed log-probability of its answer tokens given the
  prompt (teacher-forced, end of text included), and the most likely one is the model's choice
  (ties: the first listed). It never fails to parse and does not depend on decoding.
Greedy decoding, fixed seeds. Results as JSON plus a printed table; each prediction row holds the
per-item correctness under both scorings (paired comparisons read them: adapter/lalm/studies/paired.py).

    python -m adapter.lalm.evaluate --run runs/demo/moe --manifest data/corpus/test.jsonl
    python -m adapter.lalm.evaluate --run runs/demo/moe --audio my.flac --question "Which sound is this?"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from adapter.cli import run_cli
from adapter.lalm.data import Example, FeatureSource, check_categories, check_lengths, collate, read_manifest
from adapter.lalm.model import AUDIO_CATEGORIES, AudioLLM
from adapter.measures import activation_rates

LETTERS = "ABCD"
_EXPLICIT = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-D])\b", re.IGNORECASE)
_STANDALONE = re.compile(r"\b([A-D])\b")  # a capital A-D standing alone: "B", "(C)", "D) a dog"


# A word: letters and digits of any script (Cyrillic, Greek, accented Latin ...), with a trailing
# sharp or flat kept ("C#" is not "C"); each CJK ideograph or kana a word of its own (no spaces
# separate them).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+[#\u266f\u266d]*")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _normalized(text: str) -> str:
    """Case, surrounding space and punctuation, and runs of spaces ignored: how an answer that is
    exactly one of the choices is recognized."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'()[]")


def mmau_correct(prediction: str, choices: list[str], answer: str) -> bool:
    """A prediction that is exactly one of the choices (up to case, spacing and surrounding
    punctuation) is right when that choice is the answer. Otherwise: all words of the right choice
    present, and none that appear only in wrong choices."""
    exact = [c for c in choices if _normalized(c) == _normalized(prediction)]
    if len(exact) == 1:
        return exact[0] == answer
    pred = set(words(prediction))
    right = set(words(answer))
    wrong_only = set().union(*(set(words(c)) for c in choices if c != answer)) - right
    return bool(right) and right <= pred and not (pred & wrong_only)


def parse_letter(prediction: str) -> str | None:
    """The option letter an answer gives: an explicit "answer is X" / "option X" wins; otherwise a
    single capital A-D standing alone. None when there is none, or several ("A or B")."""
    explicit = {m.upper() for m in _EXPLICIT.findall(prediction)}
    if len(explicit) == 1:
        return explicit.pop()
    standalone = set(_STANDALONE.findall(prediction))
    return standalone.pop() if len(standalone) == 1 and not explicit else None


def voicebench_score(predictions: list[str], answers: list[str], seed: int = 0) -> dict:
    """Accuracy with a seeded random letter for unparseable answers, and the fail rate."""
    rng = random.Random(seed)
    correct = fails = 0
    for pred, ans in zip(predictions, answers, strict=True):
        letter = parse_letter(pred)
        if letter is None:
            fails += 1
            letter = rng.choice(LETTERS)
        correct += letter == ans
    n = max(len(answers), 1)
    return {"accuracy": correct / n, "fail_rate": fails / n, "n": len(answers)}


@torch.no_grad()
def generate_answers(
    model: AudioLLM,
    examples: list[Example],
    source: FeatureSource,
    *,
    text_questions=False,
    batch_size: int = 32,
    max_new_tokens: int = 24,
    device=None,
) -> list[str]:
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size and max_new_tokens must be > 0, got {batch_size}, {max_new_tokens}")
    device = model.device if device is None else device
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_frames)  # similar lengths together
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate(
            [examples[i] for i in idx],
            model.tokenizer,
            source,
            with_answer=False,
            left_pad=True,
            use_text_question=text_questions,
        ).to(device)
        for i, ids in zip(idx, model.generate(batch, max_new_tokens=max_new_tokens), strict=True):
            answers[i] = model.tokenizer.decode(ids).strip()
    return [answers[i] for i in range(len(examples))]


@torch.no_grad()
def option_logprobs(
    model: AudioLLM,
    examples: list[Example],
    source: FeatureSource,
    *,
    text_questions: bool = False,
    batch_size: int = 32,
    device=None,
) -> list[list[float]]:
    """For each example, the summed log-probability of each of its choices as the answer
    (AudioLLM.answer_logprobs), in the order of `ex.choices`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    missing = [ex.id for ex in examples if not ex.choices]
    if missing:
        raise ValueError(f"log-likelihood scoring needs choices; examples {missing[:5]} have none")
    device = model.device if device is None else device
    model.eval()
    pairs = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    pairs.sort(key=lambda p: examples[p[0]].num_frames)  # similar lengths together
    scores = [[0.0] * len(ex.choices) for ex in examples]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        exs = [dataclasses.replace(examples[i], answer=examples[i].choices[c]) for i, c in chunk]
        batch = collate(exs, model.tokenizer, source, use_text_question=text_questions).to(device)
        for (i, c), lp in zip(chunk, model.answer_logprobs(batch).tolist(), strict=True):
            scores[i][c] = lp
    return scores


def loglik_choice(ex: Example, scores: list[float]) -> str:
    """The most likely option (the first listed on a tie)."""
    return ex.choices[max(range(len(scores)), key=lambda c: (scores[c], -c))]


def _accuracy_table(per_task: dict[str, list[bool]], per_category: dict[str, list[bool]]) -> dict:
    """Accuracies per category, per task and overall; overall is None when no item was scored (an
    accuracy of nothing is not 0)."""
    n = sum(len(v) for v in per_category.values())
    return {
        "per_category": {c: sum(v) / len(v) for c, v in sorted(per_category.items())},
        "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        "overall": sum(sum(v) for v in per_category.values()) / n if n else None,
        "n": n,
    }


def _percent(value: float | None, width: int) -> str:
    return f"{'n/a':>{width}s}" if value is None else f"{100 * value:{width}.1f}"


def check_scorable(examples: list[Example]) -> None:
    """Refuse, before any work, items evaluation cannot score: no answer (it would always count as
    wrong), naming the manifest line."""
    unanswered = [ex.source or ex.id for ex in examples if not ex.answer]
    if unanswered:
        raise ValueError(
            f"evaluate: {len(unanswered)} item(s) have no answer to score against: {unanswered[:5]} (give each an "
            "'answer'; to only ask questions, use --audio)"
        )


@torch.no_grad()
def expert_rates(
    model: AudioLLM, examples: list[Example], source: FeatureSource, device=None, batch_size: int = 32
) -> dict[str, list[float]]:
    """Token-normalized activation rate of each routed expert per audio category (paper Fig. 3):
    the fraction of the category's audio tokens routed to the expert (rows sum to k).
    {} when the model's adapter is not an MoE adapter."""
    adapter = getattr(model, "adapter", None)
    if not hasattr(adapter, "last_topk_idx"):
        return {}
    device = model.device if device is None else device
    model.eval()
    chosen, labels = [], []
    audio_ex = [ex for ex in examples if ex.audio is not None]
    for start in range(0, len(audio_ex), batch_size):
        chunk = audio_ex[start : start + batch_size]
        batch = collate(chunk, model.tokenizer, source, with_answer=False).to(device)
        feats, mask = model.audio_inputs(batch)
        model.embed_audio(feats, mask, batch.category_B)
        idx = adapter.last_topk_idx.reshape(mask.shape[0], mask.shape[1], -1).cpu()
        for b, ex in enumerate(chunk):
            sel = idx[b][mask[b].cpu()]
            chosen.append(sel)
            labels += [ex.category] * sel.shape[0]
    if not chosen:
        return {}
    return activation_rates(torch.cat(chosen), labels, adapter.config.num_experts)


def evaluate(
    model: AudioLLM,
    examples: list[Example],
    source: FeatureSource,
    *,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 24,
    device=None,
) -> dict:
    """Scores of a model on a test manifest's examples (see the module docstring), on `device`
    (default: the model's)."""
    if not examples:
        raise ValueError("evaluate: no examples to score (an empty manifest?)")
    check_scorable(examples)
    check_lengths(examples, model.tokenizer, model.position_limit)
    if model.routes_by_category:
        check_categories(examples)
    torch.manual_seed(seed)
    preds = generate_answers(
        model, examples, source, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
    )
    with_choices = [i for i, ex in enumerate(examples) if ex.choices]  # open questions get no option scores
    lls: list[list[float] | None] = [None] * len(examples)
    scored = option_logprobs(model, [examples[i] for i in with_choices], source, batch_size=batch_size, device=device)
    for i, row in zip(with_choices, scored, strict=True):
        lls[i] = row
    per_task: dict[str, list[bool]] = defaultdict(list)
    per_category: dict[str, list[bool]] = defaultdict(list)
    per_task_ll: dict[str, list[bool]] = defaultdict(list)
    per_category_ll: dict[str, list[bool]] = defaultdict(list)
    rows = []
    vb = [(p, ex) for p, ex in zip(preds, examples, strict=True) if ex.eval == "voicebench"]
    for pred, ll, ex in zip(preds, lls, examples, strict=True):
        row = {"id": ex.id, "category": ex.category, "task": ex.task, "answer": ex.answer, "prediction": pred}
        if ll is not None:
            row["option_logprobs"] = [round(v, 4) for v in ll]  # per choice, in ex.choices' order
            row["loglik_choice"] = loglik_choice(ex, ll)
            row["correct_ll"] = row["loglik_choice"] == ex.answer
        if ex.eval == "mmau":
            ok = mmau_correct(pred, ex.choices, ex.answer)
            per_task[f"{ex.category}/{ex.task}"].append(ok)
            per_category[ex.category].append(ok)
            row["correct"] = ok
            if ll is not None:
                per_task_ll[f"{ex.category}/{ex.task}"].append(row["correct_ll"])
                per_category_ll[ex.category].append(row["correct_ll"])
        rows.append(row)
    result: dict = {
        "mmau": _accuracy_table(per_task, per_category),
        "mmau_ll": _accuracy_table(per_task_ll, per_category_ll),
    }
    if vb:
        audio_scores = voicebench_score([p for p, _ in vb], [ex.answer for _, ex in vb], seed)
        text_ex = [ex for _, ex in vb]
        text_preds = generate_answers(
            model,
            text_ex,
            source,
            text_questions=True,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            device=device,
        )
        text_scores = voicebench_score(text_preds, [ex.answer for ex in text_ex], seed)
        result["voicebench"] = {
            "audio": audio_scores,
            "text": text_scores,
            "modality_gap": audio_scores["accuracy"] - text_scores["accuracy"],
        }
        if all(ex.choices for ex in text_ex):  # the letters as options, scored by likelihood too
            vb_rows = [r for r, ex in zip(rows, examples, strict=True) if ex.eval == "voicebench"]
            text_ll = option_logprobs(model, text_ex, source, text_questions=True, batch_size=batch_size, device=device)
            audio_ok = [r["correct_ll"] for r in vb_rows]
            text_ok = [loglik_choice(ex, ll) == ex.answer for ex, ll in zip(text_ex, text_ll, strict=True)]
            for r, ok in zip(vb_rows, text_ok, strict=True):
                r["correct_ll_text"] = ok
            result["voicebench"].update(
                audio_ll=sum(audio_ok) / len(audio_ok),
                text_ll=sum(text_ok) / len(text_ok),
                modality_gap_ll=(sum(audio_ok) - sum(text_ok)) / len(text_ok),
            )
    result["expert_rates"] = expert_rates(model, examples, source, device)
    if (trained_from := getattr(model, "trained_from", None)) is not None:  # load_trained's record
        result["checkpoint"] = trained_from
    result["predictions"] = rows
    return result


def format_table(results: dict[str, dict]) -> str:
    """Paper-Table-1-shaped comparison of several evaluated models {name: evaluate(...)}."""
    names = list(results)
    w = max(12, *(len(n) + 2 for n in names))  # a column as wide as its longest preset name
    head = f"{'':28s}" + "".join(f"{n:>{w}s}" for n in names)
    lines = [head, "-" * len(head)]
    cats = sorted({c for r in results.values() for c in r["mmau"]["per_category"]})
    for c in cats:
        lines.append(
            f"{'MMAU-style ' + c:28s}"
            + "".join(f"{100 * results[n]['mmau']['per_category'].get(c, float('nan')):{w}.1f}" for n in names)
        )
    lines.append(f"{'MMAU-style all':28s}" + "".join(_percent(results[n]["mmau"]["overall"], w) for n in names))
    if all("mmau_ll" in r for r in results.values()):  # evaluations from before log-likelihood scoring lack it
        lines.append(
            f"{'MMAU-style all, log-lik':28s}" + "".join(_percent(results[n]["mmau_ll"]["overall"], w) for n in names)
        )
    if all("voicebench" in r for r in results.values()):
        for label, key in (("knowledge, text", "text"), ("knowledge, audio", "audio")):
            lines.append(
                f"{label:28s}" + "".join(f"{100 * results[n]['voicebench'][key]['accuracy']:{w}.1f}" for n in names)
            )
        lines.append(
            f"{'modality gap (audio-text)':28s}"
            + "".join(f"{100 * results[n]['voicebench']['modality_gap']:{w}.1f}" for n in names)
        )
        lines.append(
            f"{'letter parse fail rate':28s}"
            + "".join(f"{100 * results[n]['voicebench']['audio']['fail_rate']:{w}.1f}" for n in names)
        )
    if all("checkpoint" in r for r in results.values()):  # which step was scored ("!": not the newest)
        marks = {n: "" if results[n]["checkpoint"]["newest"] else "!" for n in names}
        lines.append(
            f"{'checkpoint step':28s}"
            + "".join(f"{results[n]['checkpoint']['step']}{marks[n]}".rjust(w) for n in names)
        )
        lines += [f"  ! {n}: {results[n]['checkpoint']['why_not_newest']}" for n in names if marks[n]]
    return "\n".join(lines)


def main(argv=None) -> int:
    from adapter.lalm.training.checkpoint import load_trained
    from adapter.lalm.training.setup import add_device_flag, device_from_flag

    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="a training run folder (config.json + checkpoints/)")
    p.add_argument("--manifest", help="a test manifest (JSONL) to score")
    p.add_argument("--audio", nargs="+", help="instead of a manifest: audio files (WAV/FLAC/OGG/MP3) to ask about")
    p.add_argument("--question", default="What do you hear?", help="the question asked about --audio files")
    p.add_argument(
        "--category",
        choices=AUDIO_CATEGORIES,
        help="the audio category of --audio files (a run whose adapter routes by category needs one)",
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy decoding length limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the fallback letters")
    add_device_flag(p)
    args = p.parse_args(argv)
    if not args.manifest and not args.audio:
        p.error("give --manifest or --audio")
    if args.manifest and args.audio:  # one of them would be ignored
        p.error("give --manifest (score a test set) or --audio (ask about files), not both")
    if args.out is not None and args.audio:
        p.error("--out writes a manifest's scores; --audio prints its answers")
    if args.out is not None and not args.out.parent.is_dir():  # said now, not after the whole evaluation
        p.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out {args.out} is a folder; give a file path such as {args.out / 'eval.json'}")
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    examples = read_manifest(args.manifest) if args.manifest else []
    if args.manifest and not examples:
        p.error(f"--manifest {args.manifest} holds no examples: nothing to score")
    device = device_from_flag(p, args)
    model = load_trained(args.run, device=device)  # the batches follow the model
    source = FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder)
    if args.audio:
        from adapter.lalm.data import resampled_length

        if model.routes_by_category and not args.category:
            p.error(
                f"{args.run} routes by audio category (routing='label'): give --category "
                f"{{{','.join(AUDIO_CATEGORIES)}}}"
            )
        exs = [
            Example(
                id=Path(a).name,
                question=args.question,
                audio=Path(a),
                num_samples=resampled_length(Path(a)),
                category=args.category or "",
            )
            for a in args.audio
        ]
        check_lengths(exs, model.tokenizer, model.position_limit, with_answer=False)
        for ex, ans in zip(exs, generate_answers(model, exs, source, max_new_tokens=args.max_new_tokens), strict=True):
            print(f"{ex.id}: {ans}")
        return 0
    result = evaluate(
        model,
        examples,
        source,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(format_table({Path(args.run).name: result}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
