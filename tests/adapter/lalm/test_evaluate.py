"""Scorers on hand-made outputs with known scores, and the evaluation of a trained model."""

import dataclasses

import pytest

from adapter.lalm.evaluate import mmau_correct, parse_letter, voicebench_score, words

SOUNDS = ["rain", "wind", "siren", "alarm", "knocking", "engine"]
PHRASES = ["green farmer", "green rabbit", "lazy farmer", "green kitten"]


@pytest.mark.parametrize(
    "prediction,choices,answer,expected",
    [
        ("siren", SOUNDS, "siren", True),
        ("It is a siren.", SOUNDS, "siren", True),
        ("SIREN!", SOUNDS, "siren", True),
        ("a siren or an alarm", SOUNDS, "siren", False),  # a word unique to a wrong choice
        ("alarm", SOUNDS, "siren", False),
        ("", SOUNDS, "siren", False),
        ("green farmer", PHRASES, "green farmer", True),
        ("the green farmer", PHRASES, "green farmer", True),  # 'the' is in no choice
        ("green", PHRASES, "green farmer", False),  # incomplete
        ("green farmer rabbit", PHRASES, "green farmer", False),
        ("plucked string", ["sine", "square", "sawtooth", "plucked string"], "plucked string", True),
        ("3", ["2", "3", "4", "5", "6"], "3", True),
        ("3 or 4", ["2", "3", "4", "5", "6"], "3", False),
    ],
)
def test_mmau_matching(prediction, choices, answer, expected):
    assert mmau_correct(prediction, choices, answer) is expected


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("D) a dog", "D"),
        ("The answer is A.", "A"),
        ("answer: c", "C"),
        ("I think option B is right", "B"),
        ("A or B", None),  # ambiguous
        ("I do not know", None),
        ("a dog", None),  # a lowercase article is not an option letter
        ("", None),
    ],
)
def test_letter_parsing(text, letter):
    assert parse_letter(text) == letter


def test_voicebench_scoring_with_seeded_fallback():
    preds = ["A", "B", "no idea", "D", "maybe"]
    answers = ["A", "C", "B", "D", "A"]
    a = voicebench_score(preds, answers, seed=3)
    b = voicebench_score(preds, answers, seed=3)
    assert a == b and a["fail_rate"] == pytest.approx(0.4) and a["n"] == 5
    assert 0.4 <= a["accuracy"] <= 0.8  # 2 parsed right, 1 parsed wrong, 2 random
    assert voicebench_score(["A"] * 4, list("ABCD"))["accuracy"] == 0.25
    assert words("It's a Siren!") == ["it", "s", "a", "siren"]


def test_cli_refuses_bad_sizes_and_empty_manifests(tmp_path, capsys):
    """Issue 20 item 15: argparse-style errors that name the flag, before any model is loaded."""
    from adapter.lalm import evaluate
    from adapter.lalm.corpus.__main__ import main as corpus_main

    manifest = tmp_path / "test.jsonl"
    manifest.write_text('{"id": "a", "question": "q", "answer": "x"}\n')
    for flag in ("--batch-size", "--max-new-tokens"):
        with pytest.raises(SystemExit):
            evaluate.main(["--run", str(tmp_path / "no-run"), "--manifest", str(manifest), flag, "0"])
        assert f"{flag} must be > 0, got 0" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(tmp_path / "no-run"), "--manifest", str(empty)])
    assert "empty.jsonl holds no examples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no examples to score"):
        evaluate.evaluate(None, [], None)
    with pytest.raises(SystemExit):
        corpus_main(["--out", str(tmp_path / "c"), "--workers", "0"])
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["evaluate", "analysis", "diagnose"])
def test_the_device_a_trained_model_runs_on(tool, tmp_path, capsys, monkeypatch):
    """The tools that run a trained model run it where training ran: the GPU when torch sees one
    (and the experiment runners' evaluation), else the CPU; `--device` picks another, and one this
    torch cannot use is refused by name before any model is loaded."""
    import importlib

    import torch

    from adapter.lalm.training.setup import default_device

    module = {"evaluate": "adapter.lalm.evaluate", "analysis": "adapter.lalm.studies.analysis"}
    main = importlib.import_module(module.get(tool, f"adapter.lalm.studies.{tool}")).main
    manifest = tmp_path / "test.jsonl"
    manifest.write_text('{"id": "a", "question": "q", "answer": "x"}\n')
    no_run = str(tmp_path / "no-run")
    argv = {
        "evaluate": ["--run", no_run, "--manifest", str(manifest)],
        "analysis": ["--runs", no_run, "--manifest", str(manifest)],
        "diagnose": [no_run],
    }[tool]
    if not torch.cuda.is_available():
        assert default_device() == torch.device("cpu")
        with pytest.raises(SystemExit):
            main([*argv, "--device", "cuda"])
        assert "--device cuda: this torch sees no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--device", "gpu0"])
    assert "--device 'gpu0': " in capsys.readouterr().err
    with pytest.raises((SystemExit, FileNotFoundError)) as missing:  # a usable device: on to the missing run
        main([*argv, "--device", "cpu"])
    assert "no-run" in capsys.readouterr().err + str(missing.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert default_device() == torch.device("cuda", 1)


def test_log_likelihood_scoring_picks_the_most_likely_option(tone_corpus):
    from adapter.lalm.assemble import build_model
    from adapter.lalm.config import ModelConfig
    from adapter.lalm.data import FeatureSource, collate, read_manifest
    from adapter.lalm.evaluate import evaluate, loglik_choice, option_logprobs

    model = build_model(
        ModelConfig(encoder="demo", audio_dim=32, tiny_llm_hidden=64, adapter_backend="torch"), seed=0
    ).eval()
    source = FeatureSource(80, encoder=model.encoder)
    exs = [dataclasses.replace(ex, choices=["high", "low", "in between"]) for ex in read_manifest(tone_corpus[1])[:4]]
    scores = option_logprobs(model, exs, source, batch_size=5)  # 12 (example, option) pairs in 3 batches
    for ex, row in zip(exs, scores, strict=True):
        for choice, lp in zip(ex.choices, row, strict=True):
            alone = collate([dataclasses.replace(ex, answer=choice)], model.tokenizer, source)
            assert model.answer_logprobs(alone)[0].item() == pytest.approx(lp, rel=1e-4)
    assert loglik_choice(exs[0], [-1.0, -0.5, -0.5]) == "low"  # a tie goes to the first listed
    result = evaluate(model, exs, source)
    picks = [r["loglik_choice"] for r in result["predictions"]]
    assert picks == [loglik_choice(ex, row) for ex, row in zip(exs, scores, strict=True)]
    assert result["mmau_ll"]["overall"] == sum(p == ex.answer for p, ex in zip(picks, exs, strict=True)) / 4
    with pytest.raises(ValueError, match="needs choices"):
        option_logprobs(model, [dataclasses.replace(exs[0], choices=[])], source)


@pytest.mark.parametrize(
    "choices, answer, prediction, right",
    [
        (["猫", "狗", "鸟"], "狗", "这是狗", True),  # Chinese: no spaces, each ideograph a word
        (["猫", "狗", "鸟"], "狗", "这是猫", False),
        (["кошка", "собака"], "собака", "Это собака.", True),  # Cyrillic
        (["γάτα", "σκύλος"], "γάτα", "σκύλος", False),  # Greek
        (["C", "C#", "D"], "C", "C#", False),  # a sharp is not the natural
        (["C", "C#", "D"], "C#", "c#", True),
        (["C", "C#", "D"], "C", "C.", True),
        (["green farmer", "farmer"], "farmer", "Farmer!", True),  # exactly one choice: decided by it
    ],
)
def test_answers_in_any_script_and_exact_choices_are_scored(choices, answer, prediction, right):
    """Issue 39 item 4: answers without ASCII letters or digits could never be right, and "C" and
    "C#" counted as the same answer."""
    assert mmau_correct(prediction, choices, answer) is right


def test_a_table_with_no_log_likelihood_items_says_n_a():
    from adapter.lalm.evaluate import _accuracy_table, format_table

    empty = _accuracy_table({}, {})
    assert empty["overall"] is None and empty["n"] == 0
    result = {"mmau": _accuracy_table({"sound/x": [True]}, {"sound": [True]}), "mmau_ll": empty}
    line = [ln for ln in format_table({"run": result}).splitlines() if "log-lik" in ln][0]
    assert line.split()[-1] == "n/a"


@pytest.mark.parametrize(
    "record, match",
    [
        ({"choices": ["a", "b"], "answer": "c"}, r"'answer' 'c' is not one of the choices \['a', 'b'\]"),
        ({"choices": ["a", "b"]}, r"'answer' None is not one of the choices"),
        ({"choices": ["a", "a"], "answer": "a"}, r"'choices' repeat an option"),
        ({"eval": "voicebench", "answer": "Paris"}, r"a voicebench item's 'answer' must be a letter A-D, got 'Paris'"),
    ],
)
def test_unscorable_items_are_refused_when_the_manifest_is_read(tmp_path, record, match):
    """Issue 39 item 4: a missing answer, an answer not among the choices and a non-letter
    spoken-knowledge answer were accepted and always scored wrong."""
    import json

    from adapter.lalm.data import read_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "i", "question": "q", **record}) + "\n")
    with pytest.raises(ValueError, match=rf"m.jsonl:1: {match}"):
        read_manifest(manifest)


def test_evaluate_refuses_items_without_an_answer_before_any_work():
    from adapter.lalm.data import Example
    from adapter.lalm.evaluate import evaluate

    items = [
        Example(id="a", question="q", answer="x", source="t.jsonl:1"),
        Example(id="b", question="q", source="t.jsonl:2"),
    ]
    with pytest.raises(ValueError, match=r"1 item\(s\) have no answer to score against: \['t.jsonl:2'\]"):
        evaluate(None, items, None)  # refused before the model is touched


def test_the_scored_checkpoint_is_recorded_and_an_older_one_is_said(tmp_path, tone_corpus, capsys):
    """Issue 39 item 5: evaluate silently scored an older checkpoint when the newest was gone, and
    its output never said which step it scored."""
    import json
    import shutil

    from adapter.lalm import evaluate as ev
    from adapter.lalm.training import loop
    from tests.adapter.lalm.training.test_loop import _cfg

    run = tmp_path / "run"
    loop.train(_cfg(run, tone_corpus, max_steps=4, save_every=2, eval_every=0, keep_checkpoints=3))
    test = tmp_path / "test.jsonl"
    rows = [json.loads(ln) for ln in tone_corpus[1].read_text().splitlines()[:3]]
    test.write_text("".join(json.dumps({**r, "audio": str(tone_corpus[1].parent / r["audio"])}) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    assert ev.main(["--run", str(run), "--manifest", str(test), "--out", str(out)]) == 0
    record = json.loads(out.read_text())["checkpoint"]
    assert record["step"] == 4 and record["newest"] and len(record["config_sha256"]) == 16
    assert record["run"] == str(run) and "checkpoint step" in capsys.readouterr().out
    shutil.rmtree(run / "checkpoints" / "step_0000004")  # the newest gone: step 2 is what remains
    with pytest.warns(UserWarning, match=r"loading step_0000002, as the run's newest checkpoint, step_0000004, is"):
        assert ev.main(["--run", str(run), "--manifest", str(test), "--out", str(out)]) == 0
    record = json.loads(out.read_text())["checkpoint"]
    assert record["step"] == 2 and not record["newest"]
    printed = capsys.readouterr().out
    assert "2!" in printed and "! run: the run's newest checkpoint, step_0000004, is missing" in printed


def test_arguments_that_would_waste_the_evaluation_are_refused_first(tmp_path, capsys):
    """Issue 39 item 11: --out into a missing folder failed after the whole evaluation, and
    --manifest with --audio scored nothing and exited 0."""
    from adapter.lalm import evaluate as ev

    manifest = tmp_path / "test.jsonl"
    manifest.write_text('{"id": "a", "question": "q", "answer": "x"}\n')
    run = str(tmp_path / "no-run")  # refused before the run is even looked at
    for argv, said in [
        (["--manifest", str(manifest), "--audio", "a.wav"], "not both"),
        (["--manifest", str(manifest), "--out", str(tmp_path / "missing" / "e.json")], "does not exist"),
        (["--manifest", str(manifest), "--out", str(tmp_path)], "is a folder"),
        (["--audio", "a.wav", "--out", str(tmp_path / "e.json")], "--out writes a manifest's scores"),
    ]:
        with pytest.raises(SystemExit):
            ev.main(["--run", run, *argv])
        assert said in capsys.readouterr().err


def test_a_mistyped_backend_is_refused_before_the_demo_trains(capsys):
    from adapter.lalm import demo

    with pytest.raises(ValueError, match=r"adapter_backend must be one of .*, got 'trito'"):
        demo.main(["--backend", "trito"])
