"""Writing files so that nothing written is ever lost or torn.

:func:`atomic_write` is the one way ``some`` writes a file that someone else
may read (checkpoints, metrics, caches, pictures, reports): the bytes go to a
temporary file in the same directory, which then replaces the target with
``os.replace``. A reader (another run sharing a cache, a crash, a resume)
sees either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["PathLike", "atomic_write", "write_json"]

PathLike = str | os.PathLike
Writer = Callable[[IO[bytes]], None]


def atomic_write(path: PathLike, data: bytes | str | Writer, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``data`` is bytes, text (written as UTF-8), or a function that writes to
    the binary file object it is given (e.g. ``lambda f: torch.save(state, f)``).
    With ``durable`` the file and the rename are fsynced, so the new content
    survives a power loss too (checkpoints). A failure leaves the old file and
    no temporary file behind. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    return path


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as JSON (with a final newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")
