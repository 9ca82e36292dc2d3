"""adapter/cli.py: one line and status 1 for a bad input, tracebacks for bugs, clean stops on signals."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.cli import TRACEBACK_ENV, Stopped, _prog, add_note, run_cli, stop_requests

ROOT = Path(__file__).resolve().parents[2]


def _raising(exc: BaseException):
    def main(argv=None) -> int:
        raise exc

    return main


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("lr must be a positive finite number, got -1.0"),
        FileNotFoundError("manifest not found: /data/x.jsonl"),
        PermissionError(13, "Permission denied", "/data/x.jsonl"),
        OSError(5, "Input/output error", "/data/clip.wav"),
    ],
    ids=["value", "not-found", "permission", "oserror-with-file"],
)
def test_an_input_error_is_one_line_and_status_1(exc, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert run_cli(_raising(exc), [], prog="prog") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"prog: error: {exc}" and TRACEBACK_ENV in err[1] and len(err) == 2, err


class _NoAddNote(OSError):
    """An exception as Python 3.10 makes them: no add_note method."""

    @property
    def add_note(self):
        raise AttributeError("add_note")


@pytest.mark.parametrize("python", ["3.11", "3.10"])
def test_the_notes_of_an_error_are_printed_with_it(python, capsys, monkeypatch):
    """A failed checkpoint save adds a note saying which checkpoint stands (train.Checkpointer): the
    one-line report of an input error carries it, and so does a bug's report on Python 3.10, whose
    tracebacks do not show notes (simulated: an exception without add_note, and version_info)."""
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    cls = OSError if python == "3.11" else _NoAddNote
    if python == "3.10":
        monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    exc = cls(28, "No space left on device", "/runs/x/step_0000004.tmp/optimizer.pt")
    note = "checkpoint step_0000004 was not saved; the newest complete checkpoint stands"
    add_note(exc, note)
    add_note(exc, "a second note")
    assert exc.__notes__ == [note, "a second note"]
    assert run_cli(_raising(exc), [], prog="prog") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [f"prog: error: {exc}", exc.__notes__[0], "a second note"], err
    bug = cls(28, "No space left on device")  # no file named: not an input error, the traceback stays
    add_note(bug, "what stands")
    with pytest.raises(cls):
        run_cli(_raising(bug), [], prog="prog")
    shown = capsys.readouterr().err
    assert ("what stands" in shown) == (python == "3.10"), shown  # 3.11's traceback prints it itself


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("k"), OSError(28, "No space left on device")])
def test_a_bug_keeps_its_traceback(exc, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(type(exc)):
        run_cli(_raising(exc), [], prog="prog")


def test_the_environment_variable_keeps_every_traceback(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="bad"):
        run_cli(_raising(ValueError("bad")), [], prog="prog")
    with pytest.raises(KeyboardInterrupt):
        run_cli(_raising(KeyboardInterrupt()), [], prog="prog")


def test_stops_and_interrupts_exit_as_a_shell_reports_them(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert run_cli(_raising(Stopped("stopped after step 3", signal.SIGTERM)), [], prog="prog") == 143
    assert capsys.readouterr().err == "prog: stopped after step 3\n"
    assert run_cli(_raising(KeyboardInterrupt()), [], prog="prog") == 130
    assert capsys.readouterr().err.strip() == "prog: interrupted"
    monkeypatch.setenv("RANK", "1")  # torchrun: rank 0 alone says it
    assert run_cli(_raising(Stopped("stopped after step 3", signal.SIGINT)), [], prog="prog") == 130
    assert capsys.readouterr().err == ""


def test_status_passes_through_and_prog_is_the_module():
    from adapter.lalm import train
    from benchmarks import run

    assert run_cli(lambda argv: 0, []) == 0 and run_cli(lambda argv: 3, []) == 3
    assert _prog(train.main) == "python -m adapter.lalm.train" and _prog(run.main) == "python -m benchmarks.run"


def test_first_signal_is_recorded_the_second_acts_and_handlers_come_back():
    # Python's own SIGINT handler, whatever this process inherited: a shell starts a background job
    # (`pytest ... &`) with SIGINT ignored, and Python then installs none (seen 2026-12-08).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_first_signal_recorded_second_acts()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _check_first_signal_recorded_second_acts():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_requests(announce=False) as received:
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):  # the second signal: Python's own handler again
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
    with stop_requests(announce=False) as received:
        os.kill(os.getpid(), signal.SIGINT)
        assert received == [signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before


def test_outside_the_main_thread_signals_are_left_alone():
    import threading

    seen = {}

    def worker():
        with stop_requests(announce=False) as received:
            seen["received"] = received
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["received"] == [] and seen["handler"] == signal.getsignal(signal.SIGTERM)


def test_a_cli_reports_a_missing_manifest_in_one_line(tmp_path):
    missing = tmp_path / "missing.jsonl"
    env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV} | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "adapter.lalm.train", "--train-manifest", str(missing), "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"python -m adapter.lalm.train: error: manifest not found: {missing}" in proc.stderr.splitlines()


def test_a_failed_run_ends_in_one_line_not_a_traceback(capsys, monkeypatch):
    """Issue 39 item 16: a run whose every step was skipped ended with a traceback."""
    from adapter.cli import RunFailed, run_cli

    monkeypatch.delenv("MOE_ADAPTER_TRACEBACK", raising=False)

    def main(argv):
        raise RunFailed("all 3 steps of the run in runs/x were skipped as non-finite")

    assert run_cli(main, [], prog="python -m adapter.lalm.train") == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m adapter.lalm.train: error: all 3 steps") and "Traceback" not in err
