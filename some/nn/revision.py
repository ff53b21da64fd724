"""Which revision of the ablation methods' semantics a saved model was trained with.

Checkpoints (``methods_revision`` in the state) and exported model directories
(``methods_revision`` in ``config.json``) record :data:`METHODS_REVISION`. A
file of an older revision still loads, with one warning naming the changes
that apply to its configuration: its weights were trained for the old
semantics and now run with the new ones.

Revisions:

1. (files without the field) the methods as first built.
2. Each method computes what its authors' code computes (DynMoE, EMoE, top-p):
   top-any gates divide by the fired count taken as a constant; ``avg_k``
   gates are 1; constructed experts carry ``b2 / top_k`` with keys at the mean
   raw ``W1`` row; the adaptive process keys an added expert at the raw router
   outputs and restarts its threshold at 0; top-p stops where the cumulative
   probability exceeds ``p`` strictly.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["METHODS_REVISION", "methods_changes", "warn_if_methods_changed"]

METHODS_REVISION = 2

# (what in the configuration it applies to, the change), revision 1 -> 2
_CHANGES_2 = (
    (lambda c: c.get("gating") == "top_any",
     "top_any gates now divide the fired mask by the fired count taken as a constant (gradients changed)"),
    (lambda c: c.get("gating") == "avg_k",
     "avg_k gates are now 1 (the layer sums its k experts; it averaged them)"),
    (lambda c: c.get("gating") == "top_p",
     "top_p now keeps the next expert when the cumulative probability equals p exactly"),
    (lambda c: bool(c.get("adaptive")),
     "the adaptive process now keys an added expert at the raw router outputs and restarts its threshold at 0"),
    (lambda c: c.get("expert_init") == "cluster",
     "constructed experts are now cut with bias b2/top_k and raw-mean keys (the saved experts keep b2/N)"),
)


def methods_changes(config: Any, revision: int) -> list[str]:
    """The semantics changes since ``revision`` that apply to ``config`` (a config
    object or a dict of its fields)."""
    fields = config if isinstance(config, Mapping) else vars(config)
    if revision >= 2:
        return []
    return [text for applies, text in _CHANGES_2 if applies(fields)]


def warn_if_methods_changed(config: Any, revision: int | None, source: str) -> None:
    """One warning when ``source`` (a file) was written at an older methods revision
    (``None``: a file of revision 1, before the field) and a change applies to it."""
    revision = 1 if revision is None else int(revision)
    if revision > METHODS_REVISION:
        warnings.warn(f"{source} was written by a newer some (methods revision {revision}; this one has "
                      f"{METHODS_REVISION}): its methods may compute differently here", stacklevel=3)
        return
    changes = methods_changes(config, revision)
    if changes:
        warnings.warn(f"{source} was trained at methods revision {revision}; since then (revision "
                      f"{METHODS_REVISION}): {'; '.join(changes)}. It loads, but computes with the new semantics",
                      stacklevel=3)
