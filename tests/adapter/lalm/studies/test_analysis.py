"""The section-5 analyses on tiny trained LALM runs: checkpoints over training, CLI, figures, and the
gradient plumbing checked against a hand-rolled backward pass."""

import json

import pytest
import torch

from adapter.lalm.config import ModelConfig, TrainConfig
from adapter.lalm.data import FeatureSource, read_manifest
from adapter.lalm.studies import analysis
from adapter.lalm.training import checkpoint, loop
from adapter.lalm.training import runs as run_folder

CATS = ("speech", "sound", "music")


@pytest.fixture(scope="module")
def labelled(tone_corpus, module_tmp_path):
    """The tone corpus with its clips spread over the three categories (train and val)."""
    root = module_tmp_path / "labelled"
    root.mkdir()
    out = []
    for src in tone_corpus:
        recs = [json.loads(x) for x in src.read_text().splitlines()]
        for i, r in enumerate(recs):
            r["category"] = CATS[i % 3]
            r["audio"] = str(src.parent / r["audio"])
        dst = root / src.name
        dst.write_text("".join(json.dumps(r) + "\n" for r in recs))
        out.append(dst)
    return out


@pytest.fixture(scope="module")
def runs(labelled, module_tmp_path):
    root = module_tmp_path / "runs"
    root.mkdir()
    for adapter in ("dense", "moe-8c4"):
        loop.train(
            TrainConfig(
                train_manifest=str(labelled[0]),
                output_dir=str(root / adapter),
                model=ModelConfig(
                    encoder="demo",
                    adapter=adapter,
                    audio_dim=32,
                    tiny_llm_hidden=64,
                    tiny_llm_layers=1,
                    adapter_backend="torch",
                ),
                max_steps=3,
                max_batch_size=8,
                save_every=1,
                keep_checkpoints=3,
                eval_every=0,
                lr=1e-2,
                progress=False,
            )
        )
    return root


def test_load_trained_reads_any_kept_checkpoint(runs):
    assert run_folder.checkpoint_steps(runs / "moe-8c4") == [1, 2, 3]
    first = checkpoint.load_trained(runs / "moe-8c4", step=1).adapter.w1
    last = checkpoint.load_trained(runs / "moe-8c4").adapter.w1
    assert torch.equal(checkpoint.load_trained(runs / "moe-8c4", step=3).adapter.w1, last)
    assert not torch.equal(first, last)
    with pytest.raises(FileNotFoundError, match=r"holds \[1, 2, 3\]"):
        checkpoint.load_trained(runs / "moe-8c4", step=7)


def test_gradient_cosine_matches_a_hand_rolled_backward(runs, labelled):
    model = checkpoint.load_trained(runs / "dense")
    source = FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder)
    sets = analysis.category_batches(model, read_manifest(labelled[1]), source, batch_size=3, num_batches=2)
    result = analysis.gradient_cosine(model, sets)
    grads = {}
    for c in CATS:  # mean over the two batches of the per-batch adapter gradients, by .backward()
        model.zero_grad()
        for s in sets:
            out = model(s[c])
            (out.ntp_sum / out.num_tokens / len(sets)).backward()
        grads[c] = torch.cat([p.grad.reshape(-1) for p in model.adapter.parameters()]).double()
    for i, a in enumerate(CATS):
        for j, b in enumerate(CATS):
            want = torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0).item()
            assert result["cosine"][i][j] == pytest.approx(want, abs=1e-5), (a, b)
    assert result["names"] == list(CATS)
    assert result["grad_norm"]["music"] == pytest.approx(grads["music"].norm().item(), rel=1e-5)


def test_influence_scores_average_over_batches_and_restore_the_model(runs, labelled):
    model = checkpoint.load_trained(runs / "moe-8c4")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    source = FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder)
    sets = analysis.category_batches(model, read_manifest(labelled[1]), source, batch_size=3, num_batches=2)
    result = analysis.influence_scores(model, sets, step_size=1e-2)
    assert [result["score"][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert all(d > 0 for d in (result["delta"][i][i] for i in range(3)))  # a step on i lowers L_i
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_category_batches_need_every_category(runs, tone_corpus):
    model = checkpoint.load_trained(runs / "dense")
    source = FeatureSource(model.encoder.dims.n_mels, encoder=model.encoder)
    with pytest.raises(ValueError, match=r"no audio examples of categories \['speech', 'music'\]"):
        analysis.category_batches(model, read_manifest(tone_corpus[1]), source)


def test_cli_writes_json_and_figures(runs, labelled, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["--runs", str(runs / "dense"), str(runs / "moe-8c4"), "--manifest", str(labelled[1])]
    assert analysis.main([*argv, "--out", str(out), "--batch-size", "3", "--num-batches", "2", "--quiet"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["dense"]["heatmap"] == {}
    rates = result["moe-8c4"]["heatmap"]
    assert set(rates) == set(CATS) and all(sum(r) == pytest.approx(4) for r in rates.values())
    for name in ("dense", "moe-8c4"):
        assert [t["step"] for t in result[name]["cosine"]] == [1, 2, 3]
        assert len(result[name]["influence"]["score"]) == 3
    for png in ("heatmap.png", "cosine.png", "influence.png"):
        assert (out / png).stat().st_size > 5000, png
    assert "analysis.json" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        analysis.main(["--runs", str(tmp_path), "--manifest", str(labelled[1])])  # not a run folder


def test_runs_with_the_same_folder_name_keep_apart(tmp_path):
    from adapter.lalm.studies.analysis import run_labels

    a, b = tmp_path / "seed-0" / "dense" / "joint", tmp_path / "seed-0" / "moe" / "joint"
    assert run_labels([a, b]) == ["dense/joint", "moe/joint"]  # not both "joint": one would overwrite the other
    assert run_labels([tmp_path / "dense", tmp_path / "moe"]) == ["dense", "moe"]
    with pytest.raises(ValueError, match="given twice"):
        run_labels([a, a])


@pytest.mark.parametrize(
    "flag, value", [("--batch-size", "0"), ("--num-batches", "0"), ("--num-batches", "-1"), ("--step-size", "nan")]
)
def test_cli_refuses_sizes_that_would_do_nothing(tmp_path, capsys, flag, value):
    """Issue 39 item 15: these ended in raw Python errors (or an empty analysis)."""
    with pytest.raises(SystemExit):
        analysis.main(["--runs", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl"), flag, value])
    assert f"{flag} must be" in capsys.readouterr().err
