"""Every user-facing exception of ``some``, in one place.

All of them derive from :class:`SomeError`: the problem is the user's to fix
(a bad configuration, a missing corpus, a damaged file, a run that diverged),
so the ``some`` command prints it as one line ``some: error: ...`` without a
traceback. Each also derives from the built-in exception a Python user would
catch for it (``ValueError`` for bad values, ``RuntimeError`` for runs that
cannot go on), so ``except ValueError`` keeps working.

Errors of the ops (bad tensors) stay the built-in ``ValueError`` /
``TypeError`` / ``IndexError`` that PyTorch raises from C++ for them.
"""
from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorpusUnavailableError",
    "ModelFileError",
    "PeerLostError",
    "RunDirError",
    "RunStopped",
    "RunsFailed",
    "SomeError",
    "StudyError",
    "TrainingDiverged",
]


class SomeError(Exception):
    """Base of the errors that are the user's to fix (reported in one line)."""

    exit_code = 1


class ConfigError(SomeError, ValueError):
    """A user error in a configuration: unknown key or preset, bad value."""

    exit_code = 2


class StudyError(ConfigError):
    """A study file that cannot be run as written (or a run directory that
    belongs to another version of it); the message names the place."""


class CorpusUnavailableError(SomeError, RuntimeError):
    """A corpus cannot be loaded here: a package, a file or the network is missing.

    The message names what is missing and how to get it (or which offline sources exist).
    """


class CheckpointError(SomeError, RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


class ModelFileError(SomeError, RuntimeError):
    """A saved model (``save_pretrained`` directory) that is missing, damaged or foreign."""


class RunDirError(SomeError, RuntimeError):
    """A run directory that cannot be used as asked (exists / nothing to resume / in use)."""


class RunStopped(SomeError, RuntimeError):
    """The run stopped on request (a test's fault injection) after saving its checkpoint."""


class TrainingDiverged(SomeError, RuntimeError):
    """The loss, a gradient or a key-store statistic became NaN/Inf; the run stopped."""


class PeerLostError(SomeError, RuntimeError):
    """A collective failed or timed out: another rank died or stopped responding."""


class RunsFailed(SomeError, RuntimeError):
    """Some runs of a study failed (the others finished and are summarized);
    the message names each failed run and its log."""
