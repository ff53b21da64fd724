"""The SoME ops (docs/method.md §5): ``route``, ``experts``, ``keystore_stats``, ``keystore_update``.

One API over two backends (docs/method.md §8): ``native``, the kernels registered as
``torch.ops.some.*`` (C++ on the CPU, CUDA on GPUs; :mod:`some.ops.native`),
and ``torch``, the same ops in plain PyTorch (:mod:`some.ops.torch_backend`).
``auto`` (the default) takes the native kernels where they are built for the
tensors' device; ``use_backend`` or ``$SOME_OPS_BACKEND`` forces one. The
layers of :mod:`some.nn` call these functions, never the dispatcher ops.
"""
from .api import experts, keystore_stats, keystore_update, procedural_experts, route
from .backend import BACKENDS, ENV_VAR, backend_for, forced_backend, use_backend
from .native import build_info
from .types import GATINGS, SCORE_MODES, ExpertSpec, KeystoreStats, RouteResult

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "GATINGS",
    "SCORE_MODES",
    "ExpertSpec",
    "KeystoreStats",
    "RouteResult",
    "backend_for",
    "build_info",
    "experts",
    "forced_backend",
    "keystore_stats",
    "keystore_update",
    "procedural_experts",
    "route",
    "use_backend",
]
