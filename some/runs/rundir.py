"""The run directory: what may start or resume there, its log and its files.

    config.yaml       the full configuration
    run.json          parameter counts, steps, device, versions
    train.log         everything the run logged
    metrics.jsonl     one line per epoch
    checkpoint.pt     latest good state (atomic writes), for --resume
    analysis.json     middle-layer utilization at the end
    usage_histogram.png, keystore_umap.png, report.md

Only the main rank writes; every file is written atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from ..errors import RunDirError
from ..files import atomic_write, write_json

__all__ = ["CHECKPOINT", "LOGGER", "ConsoleHandler", "RunDirectory", "console_logging_configured"]

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
# What a run writes before its first checkpoint: a directory holding only these
# belongs to a run that died early, and a new run may start there.
DYNAMICS_FILE = "dynamics.jsonl"  # routing dynamics (some.runs.dynamics)
TENSORBOARD_DIR = "tensorboard"
START_FILES = frozenset({LOCK, "config.yaml", "run.json", "train.log", "dense.json", "digest.rank0.jsonl",
                         "digest.rank1.jsonl", DYNAMICS_FILE, TENSORBOARD_DIR})
LOGGER = "some"  # the package's root logger: every module's messages reach train.log


class ConsoleHandler(logging.Handler):
    """Print records above a tqdm progress bar (which a plain print would break)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 -- logging must never take the run down
            self.handleError(record)


def console_logging_configured() -> bool:
    """Whether records of the ``some`` loggers already reach the console (the
    ``some`` command's handler, or an application's ``logging.basicConfig``)."""
    logger: logging.Logger | None = logging.getLogger(LOGGER)
    while logger is not None:
        for h in logger.handlers:
            if isinstance(h, ConsoleHandler) or (type(h) is logging.StreamHandler
                                                 and getattr(h, "stream", None) in (sys.stdout, sys.stderr)):
                return True
        logger = logger.parent if logger.propagate else None
    return False


class RunDirectory:
    """One run's directory. ``is_main``: this process writes (rank 0)."""

    def __init__(self, path: str | Path, *, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self._lock: IO[str] | None = None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def check(self, resume: bool) -> None:
        """A new run needs an empty (or absent) directory, or the remains of a run
        that stopped before its first checkpoint; a resumed one a checkpoint."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} exists and is not a directory")
        if resume:
            if not self.checkpoint.is_file():
                raise RunDirError(f"nothing to resume: no {CHECKPOINT} in {self.path}")
        elif self.path.exists():
            present = {p.name for p in self.path.iterdir()}
            if present and not (present <= START_FILES and CHECKPOINT not in present):
                raise RunDirError(f"run directory {self.path} is not empty; pass --resume to continue "
                                  f"the run there, or choose another --out (or delete it to start over)")

    def create(self) -> None:
        """Make the directory (main rank) and hold its lock: one run per directory."""
        if not self.is_main:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.path}: {e.strerror or e}") from None
        self.acquire()

    # ------------------------------------------------------------------ lock
    def acquire(self) -> None:
        """An exclusive lock on ``RUN_DIR/.lock`` for the run's life (released by
        :meth:`release`, or by the OS when the process dies)."""
        if self._lock is not None:
            return
        lock_path = self.path / LOCK
        try:
            f = open(lock_path, "a+")  # noqa: SIM115 (held open for the run's life)
        except OSError as e:
            raise RunDirError(f"cannot use run directory {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise RunDirError(f"run directory {self.path} is in use by PID {pid} (another 'some train'); wait for "
                              f"it or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f
        # the remains of a run that stopped before its first checkpoint: start over
        if not self.checkpoint.exists():
            for name in START_FILES - {LOCK}:
                path = self.path / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass

    # ------------------------------------------------------------------- log
    @contextlib.contextmanager
    def logging(self, echo: bool = True) -> Iterator[None]:
        """While inside, every ``some.*`` logger's INFO records go to ``train.log``
        (main rank) and, with ``echo``, to stdout."""
        logger = logging.getLogger(LOGGER)
        handlers: list[logging.Handler] = []
        if self.is_main:
            handlers.append(logging.FileHandler(self.path / "train.log", encoding="utf-8"))
            if echo and not console_logging_configured():
                handlers.append(ConsoleHandler())
        for h in handlers:
            h.setFormatter(logging.Formatter("%(message)s"))
            h.setLevel(logging.INFO)
            logger.addHandler(h)
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.setLevel(level)
            for h in handlers:
                logger.removeHandler(h)
                h.close()

    # ----------------------------------------------------------------- files
    def write_text(self, name: str, text: str) -> Path | None:
        return atomic_write(self.path / name, text) if self.is_main else None

    def write_json(self, name: str, obj: Any) -> Path | None:
        return write_json(self.path / name, obj) if self.is_main else None

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        """``metrics.jsonl``: one line per finished epoch (rewritten whole, so that
        a resumed run's file matches its checkpoint)."""
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
