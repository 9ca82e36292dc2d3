"""What every command-line entry point does with errors and signals, so none ends a run in a traceback
for a mistake in its input.

- `run_cli(main)`: the errors a user's input causes (a missing or unreadable file, a value a config
  refuses, a corrupt audio file: `INPUT_ERRORS`, an `OSError` that names a file) end the program with
  `<prog>: error: <message>` and the exception's notes (`add_note`) on stderr and exit status 1, the
  way argparse reports a bad flag (which exits 2). Anything else is a bug and keeps its traceback;
  `MOE_ADAPTER_TRACEBACK=1` keeps it for every error.
- Ctrl-C elsewhere ends the program with `<prog>: interrupted` and status 130, no traceback.
- `Stopped`: raised by work that stopped cleanly on a signal (training after saving a checkpoint);
  the program prints its message and exits 128 + the signal's number, as a shell reports it.
- `stop_requests()`: SIGINT and SIGTERM, while it is active, only record that a stop was asked for, so a
  loop can finish its step and save; a second signal acts as usual at once (Ctrl-C twice stops now).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

TRACEBACK_ENV = "MOE_ADAPTER_TRACEBACK"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Work ended early on a signal, cleanly (what it saved is in the message)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RunFailed(RuntimeError):
    """A run that cannot go on for a reason its message says in full (every step skipped as
    non-finite): reported in one line like an input error."""


INPUT_ERRORS = (
    RunFailed,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def add_note(exc: BaseException, note: str) -> None:
    """`exc.add_note(note)` (Python 3.11 on); on 3.10 the same `__notes__` list, which run_cli prints
    (3.10's tracebacks do not: it prints them before re-raising)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]


def _notes(exc: BaseException) -> str:
    return "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))


def _is_input_error(exc: BaseException) -> bool:
    # Another OSError is about the input only where it names a file (not a socket, not a full disk).
    return isinstance(exc, INPUT_ERRORS) or (isinstance(exc, OSError) and exc.filename is not None)


def _want_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _prog(main: Callable) -> str:
    """`python -m <module>` as the user typed it (argparse's prog for these entry points)."""
    module = main.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:  # run as a file path
            return os.path.basename(sys.argv[0])
        module = spec.name
    return f"python -m {module.removesuffix('.__main__')}"


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """`sys.exit(run_cli(main))`: main's exit status, or 1 with one line for an input error, or
    128 + signal for a clean stop."""
    prog = prog or _prog(main)
    try:
        return main(argv)
    except Stopped as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops with the same message
            print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        if _want_traceback():
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as exc:
        if _want_traceback() or not _is_input_error(exc):
            if sys.version_info < (3, 11) and _notes(exc):
                print(f"{prog}: {type(exc).__name__}: {exc}{_notes(exc)}", file=sys.stderr, flush=True)
            raise
        print(f"{prog}: error: {exc}{_notes(exc)}", file=sys.stderr)
        print(f"({TRACEBACK_ENV}=1 shows where it was raised)", file=sys.stderr, flush=True)
        return 1


@contextlib.contextmanager
def stop_requests(announce: bool = True) -> Iterator[list[int]]:
    """Yields a list that collects the signal numbers received; empty means carry on. Outside the
    main thread (where Python cannot install handlers) it stays empty and signals act as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():  # None: a handler installed outside Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def record(signum: int, frame) -> None:
        received.append(signum)
        restore()  # the next signal acts at once
        if announce:  # os.write: print() may be in the middle of a write that a signal interrupted
            name = signal.Signals(signum).name
            os.write(2, f"\n{name} received: stopping at the end of this step (again to stop now)\n".encode())

    for s in STOP_SIGNALS:
        signal.signal(s, record)
    try:
        yield received
    finally:
        restore()
