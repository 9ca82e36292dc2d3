"""Every example runs as a user would run it, and says what it claims."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str, argv: list[str], capsys) -> str:
    old = sys.argv
    sys.argv = [name, *argv]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = old
    return capsys.readouterr().out


def test_quickstart(capsys):
    out = _run("quickstart.py", [], capsys)
    assert "torch.Size([2, 50, 192])" in out and "aux=" in out


@pytest.mark.parametrize("model", ["qwen2-audio", "voxtral", "audio-flamingo-3"])
def test_swap_hf_model_upcycled_trains_saves_and_reloads(model, tmp_path, capsys):
    out = _run("swap_hf_model.py", ["--model", model, "--upcycle", "--steps", "3", "--out", str(tmp_path)], capsys)
    change = float(out.split("max |logits change| at the swap: ")[1].split()[0])
    assert change < 1e-6
    assert "identical logits = True" in out and (tmp_path / "model.safetensors").is_file()


def test_compile_adapter_has_no_graph_break(capsys):
    out = _run("compile_adapter.py", ["--tokens", "64", "--dim", "32"], capsys)
    assert "graph breaks: 0" in out
    diff = float(out.split("max |dW1 compiled - eager| = ")[1].split()[0])
    assert diff < 1e-5


def test_gradient_conflict(capsys):
    out = _run("gradient_conflict.py", ["--tokens", "64"], capsys)
    assert "gradient cosine" in out and "influence" in out and out.count("\n") > 10
