"""some: Self-Organizing Mixture of Experts for PyTorch.

Importing the package loads the compiled extension, which registers the ops
``torch.ops.some.*``; ``some.ops`` wraps them with typed Python functions.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.some.*)
from . import ops
from .layer import SoMELayer

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How the extension was built: version, torch version, CUDA, OpenMP threads."""
    return dict(_C.build_info())


__all__ = ["ops", "SoMELayer", "build_info", "__version__"]
