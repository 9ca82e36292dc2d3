"""adapter.lalm.studies.curves: what a run's log holds reaches the right panel (text-only steps, skipped
steps, evaluations, the fp16 loss scale, a run still writing its log), and the CLI on real runs."""

import json
import math

import pytest

from adapter.lalm.studies import curves
from adapter.lalm.training import loop
from tests.adapter.lalm.training.test_loop import _cfg

PNG = b"\x89PNG\r\n\x1a\n"


def _step(step, ntp, **kw):
    loads = kw.pop("loads", [0.25, 0.25, 0.3, 0.2])
    row = {"step": step, "loss": ntp, "ntp": ntp, "aux": 4.2, "lr": 1e-3, "grad_norm": 2.0, "tokens_per_s": 900.0}
    return {**row, "skipped": False, "expert_load_0": loads, **kw}


def _write_run(folder, rows, torn=False, **cfg):
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 7, "loss"' if torn else "")
    (folder / "log.jsonl").write_text(text)
    model = {"adapter": cfg.pop("adapter", "moe-8c4"), "top_k": cfg.pop("top_k", 0)}
    (folder / "config.json").write_text(json.dumps({"model": model, "grad_clip": 1.0, **cfg}))
    return folder


def test_each_log_field_reaches_its_panel(tmp_path, capsys):
    rows = [
        _step(1, 4.0, loss_scale=1024.0),
        _step(2, 2.0, aux=None, loads=None, audio_batches=0, loss_scale=1024.0),  # text-only step
        _step(3, float("nan"), grad_norm=float("inf"), skipped=True, loss_scale=1024.0),  # skipped: overflow
        {**_step(4, 3.0, loss_scale=512.0), "val_loss": 2.5, "val_tokens": 10},
        _step(5, 1.0, loss_scale=512.0),
        {"step": 5, "final": True, "val_loss": 2.25, "val_tokens": 10},
    ]
    run = curves.read_run(_write_run(tmp_path / "moe", rows, torn=True))
    assert "torn last line" in capsys.readouterr().err  # a run still writing: read as far as it got
    assert [r["step"] for r in run["steps"]] == [1, 2, 3, 4, 5]
    assert run["evals"] == [(4, 2.5), (5, 2.25)] and run["top_k"] == 4 and run["clip"] == 1.0
    out = tmp_path / "curves.png"
    drawn = curves.plot_runs([run], out, smooth=2)
    assert out.read_bytes().startswith(PNG)
    steps, mean = drawn["next-token loss"]["moe"]
    assert steps == [1, 2, 3, 4, 5]
    assert mean[:2] == [4.0, 3.0] and mean[2] == 3.0 and mean[3:] == [2.5, 2.0]  # the NaN step is left out
    assert drawn["gradient norm"]["moe"] == ([1, 2, 4, 5], [2.0] * 4)  # the skipped step is a mark instead
    assert drawn["balance loss L_aux"]["moe"][0] == [1, 3, 4, 5]  # a gap at the text-only step
    s, busiest, idlest = drawn["expert load x E"]["moe"]
    assert s == [1, 3, 4, 5] and busiest == [pytest.approx(1.2)] * 4 and idlest == [pytest.approx(0.8)] * 4
    assert drawn["loss scale (fp16)"]["moe"] == ([1, 2, 3, 4, 5], [1024.0] * 3 + [512.0] * 2)
    assert curves.moving_mean([1.0, 2.0, math.inf, 3.0], 2) == [1.0, 1.5, 1.5, 2.5]
    assert math.isnan(curves.moving_mean([math.nan, 1.0], 3)[0])
    # A dense run has no balance loss, loads or k, and no fp16 panel appears without a loss scale.
    dense = curves.read_run(_write_run(tmp_path / "dense", [_step(1, 3.0, aux=None, loads=None)], adapter="dense"))
    drawn = curves.plot_runs([dense], out)
    assert dense["top_k"] is None and "loss scale (fp16)" not in drawn
    assert drawn["balance loss L_aux"] == {} and drawn["expert load x E"] == {}


def test_the_cli_on_real_runs_and_bad_input(tmp_path, tone_corpus, capsys):
    """Two runs named alike (seed folders) are told apart by path; a folder without a log and a
    window of 0 are refused with what to do."""
    for seed in (0, 1):
        cfg = _cfg(tmp_path / f"seed-{seed}" / "moe", tone_corpus, max_steps=3, eval_every=2, save_every=0, seed=seed)
        loop.train(cfg)
    out = tmp_path / "c.png"
    runs = [str(tmp_path / f"seed-{s}" / "moe") for s in (0, 1)]
    assert curves.main([*runs, "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes().startswith(PNG) and f"curves: {out}" in capsys.readouterr().out
    run = curves.read_run(runs[0])
    assert [r["step"] for r in run["steps"]] == [1, 2, 3] and [s for s, _ in run["evals"]] == [2, 3]
    with pytest.raises(ValueError, match="two runs share a name"):
        curves.plot_runs([run, run], out)
    with pytest.raises(FileNotFoundError, match=r"holds no training log .*log.jsonl is missing"):
        curves.read_run(tmp_path)
    with pytest.raises(SystemExit):
        curves.main([runs[0], "--smooth", "0"])
    assert "--smooth must be >= 1, got 0" in capsys.readouterr().err


def test_out_names_what_is_written(tmp_path, capsys):
    """Issue 39 item 16: --out DIR wrote DIR.png but printed DIR."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(
        json.dumps({"step": 1, "loss": 1.0, "ntp": 1.0, "lr": 1e-3, "grad_norm": 1.0}) + "\n"
    )
    folder = tmp_path / "figs"
    folder.mkdir()
    for out, written in ((folder, folder / "curves.png"), (tmp_path / "plain", tmp_path / "plain.png")):
        assert curves.main([str(run), "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip() == f"curves: {written}" and written.is_file()
    with pytest.raises(SystemExit):
        curves.main([str(run), "--out", str(tmp_path / "missing" / "c.png")])
    assert "does not exist" in capsys.readouterr().err
