"""Typed fields of the configuration dataclasses: checks and conversions.

Every configuration of ``some`` (``SoMELayerConfig``, ``ModelConfig``,
``OptimConfig``, ``DataConfig``, the experiment's ``SoMEConfig``) is a flat
dataclass of plain values. This module holds what they share: a value
checked against its field's type, a ``--set`` string converted to it, an
unknown key caught with a "did you mean", and the range checks that turn an
absurd value into one :class:`~some.errors.ConfigError` naming the field.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Union

from .errors import ConfigError

__all__ = [
    "CHECKS_RUN",
    "MAX_SIZE",
    "check_choice",
    "check_field_types",
    "check_key",
    "check_range",
    "check_size",
    "coerce_floats",
    "field_names",
    "has_type",
    "parse_value",
    "project",
    "type_name",
    "validator",
]


# How many times each config's checks actually ran (a test reads it: every check once at its boundary).
CHECKS_RUN: collections.Counter[str] = collections.Counter()
# id(config) -> the content it was checked with; kept outside the instance, so vars(config) and
# dataclass machinery see the fields only (an entry goes when its config is collected)
_CHECKED: dict[int, tuple] = {}


def validator(check):
    """Decorate a config's ``validate()``: its checks run when the config enters (a preset,
    overrides, a file, a constructor given a config built by hand), and a later call on the
    same, unchanged config returns at once. The layers below re-call ``validate()`` to stay
    safe against configs built by hand; this makes those calls free, not repeated checks."""
    @functools.wraps(check)
    def validate(self):
        snapshot = (check.__qualname__, [getattr(self, f.name) for f in dataclasses.fields(self)])
        key = id(self)
        if _CHECKED.get(key) == snapshot:
            return self
        CHECKS_RUN[check.__qualname__] += 1
        check(self)
        if key not in _CHECKED:
            weakref.finalize(self, _CHECKED.pop, key, None)
        _CHECKED[key] = copy.deepcopy(snapshot)  # (a later change of a field is seen)
        return self
    return validate


# Any size beyond this is a typo, not an experiment (and overflows int32 indexing).
MAX_SIZE = 2**31 - 1


def check_size(name: str, value: int, least: int = 1, most: int = MAX_SIZE) -> None:
    """An integer field within ``least..most`` (``ConfigError`` naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
    if value < least:
        raise ConfigError(f"config field '{name}' must be >= {least}, got {value}")
    if value > most:
        raise ConfigError(f"config field '{name}' must be <= {most}, got {value}")


def field_names(cls_or_obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls_or_obj)]


def project(obj: Any, cls: type) -> Any:
    """An instance of the dataclass ``cls`` with the values of ``obj``'s fields of the same names
    (e.g. the layer configuration inside an experiment configuration)."""
    return cls(**{name: getattr(obj, name) for name in field_names(cls)})


def is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)  # Optional[X] and X | None


def has_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the field type ``tp`` (int, float, bool, str, X | None)."""
    if is_union(tp):
        return any(has_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an int is a fine float (YAML writes 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def type_name(tp: Any) -> str:
    if is_union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else tp.__name__


def check_field_types(obj: Any) -> None:
    """Every field of the dataclass ``obj`` holds a value of its declared type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not has_type(value, hints[f.name]):
            raise ConfigError(f"config field '{f.name}' must be {type_name(hints[f.name])}, got {value!r}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """``value`` is finite and within ``[lo, hi]`` (an end open where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if lo is not None and hi is not None:
            where = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            where = f" {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            where = f" {'<' if hi_open else '<='} {hi:g}"
        else:
            where = ""
        raise ConfigError(f"config field '{name}' must be a finite number{where}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"config field {name} = {value!r}; expected one of {tuple(allowed)}")


def check_key(known: Iterable[str], key: str, source: str) -> None:
    """``key`` is one of ``known`` field names, else a :class:`ConfigError` with a suggestion."""
    names = list(known)
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def coerce_floats(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML and JSON write ``1.0`` as ``1``: keep the float fields of ``cls`` floats."""
    hints = typing.get_type_hints(cls)
    return {k: float(v) if hints.get(k) is float and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in values.items()}


def parse_value(text: str, tp: Any) -> Any:
    """Convert the string ``text`` to the type ``tp`` (a dataclass field type)."""
    args = typing.get_args(tp)
    if is_union(tp) and type(None) in args:  # Optional[X] / X | None
        if text.lower() in ("none", "null", "~", ""):
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"expected a boolean (true/false), got '{text}'")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            # allow 1e4 / 10_000 style when it is a whole number
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expected an integer, got '{text}'") from None
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError(f"expected an integer, got '{text}'") from None
            return int(value)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got '{text}'") from None
    if tp is str:
        return text
    raise ValueError(f"cannot parse a value of type {tp}")
