"""Atomic file writes: a crash, power loss included, leaves the old file or the new one, never half
of one, and a failed write (a full disk) leaves no temporary. Used by every module that writes a
file someone reads back (adapters, checkpoints, manifests, results), so that writing a file does
not import the adapters.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """write(tmp) to a temporary file unique to this call beside `path`, then rename it into place;
    the temporary is removed if writing fails."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path such as {path / 'adapter.safetensors'}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_write(path: str | Path, data: bytes) -> None:
    """`data` to `path`, on the disk (fsync) when it returns."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` (UTF-8) to `path` by atomic_write, on the disk before the rename: a crash, power loss
    included, leaves the old file or the new one; a failed write (a full disk) leaves the old file
    and no temporary."""
    atomic_write(Path(path), lambda tmp: fsync_write(tmp, text.encode()))
