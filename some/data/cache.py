"""Where ``some`` caches what it computes once: tokenizers, parsed corpora, dense models."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_cache_dir"]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The root of the package's on-disk cache.

    ``cache_dir`` if given, else ``$SOME_CACHE_DIR``, else ``$XDG_CACHE_HOME/some``, else
    ``~/.cache/some``. Tokenizers live in ``<root>/tokenizers``, parsed corpora in
    ``<root>/corpora``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SOME_CACHE_DIR"):
        return Path(os.environ["SOME_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "some"
