"""The SoME ops (SPEC §5): ``route``, ``experts``, ``keystore_stats``, ``keystore_update``.

One API over the kernels registered as ``torch.ops.some.*`` (C++ on the CPU,
CUDA on GPUs; :mod:`some.ops.native`). The layers of :mod:`some.nn` call
these functions, never the dispatcher ops directly.
"""
from .api import experts, keystore_stats, keystore_update, route
from .native import build_info
from .types import GATINGS, SCORE_MODES, KeystoreStats, RouteResult

__all__ = [
    "GATINGS",
    "SCORE_MODES",
    "KeystoreStats",
    "RouteResult",
    "build_info",
    "experts",
    "keystore_stats",
    "keystore_update",
    "route",
]
