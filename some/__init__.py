"""some: Self-Organizing Mixture of Experts for PyTorch.

    import some
    model = some.SoMEForCausalLM(some.get_preset("A4"), device="meta")  # docs/method.md §2
    some.train(some.get_preset("tiny"), "runs/tiny")                      # a run with its report
    some.ops.route(query, keys, k=4, temperature=0.8)                    # the ops (docs/method.md §5)

The package is layered, each layer importing only those below it:
``ops`` (the C++/CUDA ops) -> ``nn`` (modules) -> ``data`` -> ``engine``
(training step, checkpoints, evaluation) -> ``construction`` (experts from a
dense FFN) -> ``analysis`` (metrics, measurements, plots) -> ``runs``
(experiment config, trainer, report) -> ``studies`` (ablations) -> ``cli``.

The names below are loaded on first use, so ``import some`` is fast and the
pure-Python parts work without the compiled extension.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__  # noqa: F401  (in __all__)

# public name -> the module that defines it
_API = {
    "SoMEConfig": "some.runs.config",
    "PRESETS": "some.runs.config",
    "get_preset": "some.runs.config",
    "apply_overrides": "some.runs.config",
    "Trainer": "some.runs.trainer",
    "RunResult": "some.runs.trainer",
    "train": "some.runs.trainer",
    "SoMELayer": "some.nn.layer",
    "SoMELayerConfig": "some.nn.config",
    "ModelConfig": "some.nn.config",
    "SoMEForCausalLM": "some.nn.model",
    "DenseLM": "some.nn.model",
    "DataConfig": "some.data.build",
    "build_data": "some.data.build",
    "load_checkpoint": "some.engine.checkpoint",
    "build_info": "some.ops.native",
}
_SUBPACKAGES = ("ops", "nn", "data", "engine", "construction", "analysis", "runs", "studies", "errors")

__all__ = sorted([*_API, *_SUBPACKAGES, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from . import analysis, construction, data, engine, errors, nn, ops, runs, studies  # noqa: F401
    from .data.build import DataConfig, build_data  # noqa: F401
    from .engine.checkpoint import load_checkpoint  # noqa: F401
    from .nn.config import ModelConfig, SoMELayerConfig  # noqa: F401
    from .nn.layer import SoMELayer  # noqa: F401
    from .nn.model import DenseLM, SoMEForCausalLM  # noqa: F401
    from .ops.native import build_info  # noqa: F401
    from .runs.config import PRESETS, SoMEConfig, apply_overrides, get_preset  # noqa: F401
    from .runs.trainer import RunResult, Trainer, train  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'some' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
