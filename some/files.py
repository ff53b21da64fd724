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

from .errors import ConfigError

__all__ = ["MAX_TEXT_BYTES", "PathLike", "atomic_write", "load_yaml_text", "read_text_file", "resolve_cache_dir",
           "write_json"]

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
        # mkstemp makes the file owner-only; give it the mode a plain open() would (0666 & ~umask)
        os.fchmod(fd, 0o666 & ~_umask())
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


def resolve_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """The root of the package's on-disk cache.

    ``cache_dir`` if given, else ``$SOME_CACHE_DIR``, else ``$XDG_CACHE_HOME/some``, else
    ``~/.cache/some``. Tokenizers live in ``<root>/tokenizers``, parsed corpora in
    ``<root>/corpora``, dense models in ``<root>/dense``, the record of the GPUs the native
    kernels passed the self-test on in ``<root>/verified``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SOME_CACHE_DIR"):
        return Path(os.environ["SOME_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "some"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it (and set it back at once)
    os.umask(mask)
    return mask


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as JSON (with a final newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


# ------------------------------------------------------------------- reading

MAX_TEXT_BYTES = 16 * 2**20  # a configuration or study file is small; /dev/zero is not


def read_text_file(path: PathLike, what: str = "file", *, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file, or one :class:`~some.errors.ConfigError`
    naming the file and the problem (missing, a directory or device, too large,
    unreadable, not UTF-8)."""
    path = Path(path)
    try:
        if not path.exists():
            raise ConfigError(f"{what} not found: {path}")
        if not path.is_file():
            raise ConfigError(f"{what} {path} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit // 2**20} MiB; it is not a configuration")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_yaml_text(text: str, source: str):
    """Parse YAML (safe subset) where a repeated key or an absurdly deep nesting is
    an error rather than silently the last value or a crash; :class:`ConfigError`
    names ``source``."""
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        pass

    def _mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    _UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply") from None
