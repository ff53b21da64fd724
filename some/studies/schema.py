"""Study files (docs/method.md §7): the schema of ``experiments/*.yaml``, checked as a whole.

A study file (see ``experiments/README.md``)::

    study: gating
    preset: A4                      # the base configuration (some.runs presets)
    set: {epochs: 4}                # config fields on top of it
    datasets:                       # ID corpus and an OOD corpus of another domain each
      - {name: fortunes, data_source: fortunes, ood_source: bible}
    seeds: [0, 1, 2]
    variants:                       # name -> the config fields it sets
      softmax: {gating: softmax}
      top_p: {gating: top_p}
    smoke: {preset: tiny, set: {epochs: 1}, seeds: [0, 1]}   # what --smoke runs instead

The whole file — every key, every value, every run's configuration, every
corpus — is checked before the first run starts; a problem is one
:class:`~some.errors.StudyError` naming the file and the place.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import CorpusUnavailableError, load_documents, load_tinystories, parse_source, parse_tinystories_options
from ..errors import ConfigError, StudyError
from ..fields import check_key, field_names, parse_value
from ..files import load_yaml_text, read_text_file
from ..runs import PRESETS, SoMEConfig

__all__ = ["Dataset", "Measure", "Run", "Study", "Variant", "load_study", "plural"]

STUDY_KEYS = ("study", "description", "preset", "set", "datasets", "seeds", "variants", "measure", "run_plots",
              "keep_checkpoints", "smoke")
SMOKE_KEYS = ("preset", "set", "datasets", "seeds", "variants", "measure", "run_plots")
DATASET_KEYS = ("name", "data_source", "ood_source", "set")
# What varies between the runs of a variant is the study's business, not the variant's.
RESERVED = {"seed": "seeds are the study's 'seeds'", "data_source": "corpora are the study's 'datasets'",
            "ood_source": "corpora are the study's 'datasets'"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # variant / dataset names are directory names
MAX_NAME = 100  # a directory name with room for the rest of the path
MAX_SEED = 2**32 - 1  # as the config's seed


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Measure:
    """How each trained model is measured (the ``measure`` section)."""

    latency_repeats: int = 20  # timed forward passes (after the warmup ones); the median is reported
    latency_warmup: int = 3
    latency_batch: int = 4  # sequences of seq_len real tokens per timed forward
    flops_rows: int = 4  # sequences of seq_len real tokens in the counted forward


@dataclass(frozen=True)
class Dataset:
    """An ID corpus and the OOD corpus of another domain evaluated with it."""

    name: str
    data_source: str
    ood_source: str
    overrides: dict[str, Any] = field(default_factory=dict)  # further config fields for this dataset


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # the config fields this variant sets


@dataclass(frozen=True)
class Run:
    """One training run of a study: a variant on a dataset with a seed."""

    variant: str
    dataset: str
    seed: int
    config: SoMEConfig

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.variant, self.dataset, self.seed)

    @property
    def block(self) -> str:
        """The Friedman block (dataset × seed) this run scores in."""
        return f"{self.dataset}/seed{self.seed}"

    def dir(self, out: str | Path) -> Path:
        return Path(out) / "runs" / self.variant / self.dataset / f"seed{self.seed}"


@dataclass(frozen=True)
class Study:
    """A validated study file: its settings and every run's configuration."""

    name: str
    description: str
    path: Path
    smoke: bool
    preset: str
    datasets: tuple[Dataset, ...]
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    measure: Measure
    run_plots: bool
    keep_checkpoints: bool
    runs: tuple[Run, ...]

    def default_out(self) -> Path:
        return Path("runs") / "ablations" / (f"{self.name}-smoke" if self.smoke else self.name)


def load_study(path: str | Path, smoke: bool = False, *, check_corpora: bool = True) -> Study:
    """Read and validate a study file; with ``smoke`` its ``smoke`` section
    replaces (``preset``, ``datasets``, ``seeds``, ``variants``: a subset by
    name) or extends (``set``, ``measure``) the main settings.

    Every run's configuration is built and validated, and (``check_corpora``)
    every corpus is loaded once, so that nothing fails after training starts.
    """
    path = Path(path)
    try:
        raw = load_yaml_text(read_text_file(path, "study file"), f"study file {path}")
    except StudyError:
        raise
    except ConfigError as e:
        raise StudyError(str(e)) from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a mapping (study, preset, set, datasets, seeds, variants, ...), "
                         f"got {type(raw).__name__}")
    _check_keys(raw, STUDY_KEYS, f"{path}")
    for key in ("preset", "variants"):
        if key not in raw:
            raise StudyError(f"{path}: missing '{key}'")

    settings = dict(raw)
    if smoke:
        section = raw.get("smoke")
        if not isinstance(section, dict):
            raise StudyError(f"{path}: --smoke needs a 'smoke' section (a mapping), found "
                             f"{'none' if section is None else type(section).__name__}")
        _check_keys(section, SMOKE_KEYS, f"{path}: smoke")
        for key in ("preset", "datasets", "seeds", "run_plots"):
            if key in section:
                settings[key] = section[key]
        for key in ("set", "measure"):  # extend: the study's own settings stay, sizes change
            settings[key] = {**_mapping(raw.get(key), f"{path}: {key}"),
                             **_mapping(section.get(key), f"{path}: smoke: {key}")}

    where = str(path)
    name = _check_name(str(raw.get("study") or path.stem), f"{where}: study")
    preset = settings["preset"]
    if not isinstance(preset, str) or preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), PRESETS, n=2, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise StudyError(f"{where}: unknown preset {preset!r}{hint}; available: {', '.join(PRESETS)}")
    base = {**dataclasses.asdict(SoMEConfig(**PRESETS[preset])),
            **_fields(settings.get("set"), f"{where}: set")}
    if "seed" in _mapping(settings.get("set"), where):
        raise StudyError(f"{where}: set: 'seed' cannot be set here ({RESERVED['seed']})")

    seeds = _seeds(settings.get("seeds", [0]), f"{where}: seeds")
    datasets = _datasets(settings.get("datasets"), base, f"{where}: datasets")
    variants = _variants(raw["variants"], f"{where}: variants")
    if smoke and "variants" in raw["smoke"]:
        variants = _smoke_variants(raw["smoke"]["variants"], variants, f"{where}: smoke: variants")
    measure = _measure(settings.get("measure"), f"{where}: measure")
    flags = {}
    for key, default in (("run_plots", True), ("keep_checkpoints", False)):
        flags[key] = settings.get(key, default)
        if not isinstance(flags[key], bool):
            raise StudyError(f"{where}: {key} must be true or false, got {flags[key]!r}")

    runs = []
    for variant in variants:
        for ds in datasets:
            for seed in seeds:
                fields_ = {**base, **ds.overrides, "data_source": ds.data_source, "ood_source": ds.ood_source,
                           **variant.overrides, "seed": seed}
                try:
                    config = SoMEConfig(**fields_).validate()
                    config.data_config().validate()  # e.g. an OOD corpus that is the ID one
                except (ConfigError, ValueError) as e:
                    raise StudyError(f"{where}: variant '{variant.name}' on dataset '{ds.name}' "
                                     f"(seed {seed}): {e}") from None
                runs.append(Run(variant.name, ds.name, seed, config))
    study = Study(name=name, description=str(raw.get("description") or "").strip(), path=path, smoke=smoke,
                  preset=preset, datasets=datasets, seeds=seeds, variants=variants, measure=measure,
                  run_plots=flags["run_plots"], keep_checkpoints=flags["keep_checkpoints"], runs=tuple(runs))
    if check_corpora:
        _check_corpora(study)
    return study


def _check_keys(mapping: dict, allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=2, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise StudyError(f"{where}: unknown key {key!r}{hint} (allowed: {', '.join(allowed)})")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _fields(mapping: Any, where: str) -> dict[str, Any]:
    """Config fields of a study section: names checked, values converted to
    the field types (YAML reads ``3e-3`` as a string, ``1`` as an int)."""
    hints = typing.get_type_hints(SoMEConfig)
    out = {}
    for key, given in _mapping(mapping, where).items():
        try:
            check_key(field_names(SoMEConfig), str(key), where)
        except ConfigError as e:
            raise StudyError(str(e)) from None
        tp, value = hints[key], given
        if isinstance(given, str) and tp is not str and typing.get_args(tp) != (str, type(None)):
            try:
                value = parse_value(given, tp)
            except ValueError as e:
                raise StudyError(f"{where}: {key}: {e}") from None
        elif tp is float and isinstance(given, int) and not isinstance(given, bool):
            value = float(given)
        out[key] = value
    return out


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in value):
        raise StudyError(f"{where}: expected a non-empty list of integers in 0..{MAX_SEED}, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where}: a seed is listed twice: {value}")
    return tuple(value)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME:
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "..."
        raise StudyError(f"{where}: name {shown!r} must be 1..{MAX_NAME} letters, digits and _.+- (it names a "
                         f"directory)")
    return name


def _datasets(value: Any, base: dict[str, Any], where: str) -> tuple[Dataset, ...]:
    if value is None:  # one dataset: the corpora of the base configuration
        if not base.get("ood_source"):
            raise StudyError(f"{where}: missing; give 'datasets' (name, data_source, ood_source each) or "
                             f"data_source and ood_source in 'set' (every run reports OOD perplexity)")
        value = [{"name": _dir_name(base["data_source"]), "data_source": base["data_source"],
                  "ood_source": base["ood_source"]}]
    if not isinstance(value, list) or not value:
        raise StudyError(f"{where}: expected a non-empty list of datasets, got {value!r}")
    out, names = [], set()
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise StudyError(f"{here}: a dataset is a mapping (name, data_source, ood_source), got {item!r}")
        _check_keys(item, DATASET_KEYS, here)
        for key in ("data_source", "ood_source"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise StudyError(f"{here}: missing '{key}' (every dataset is an ID corpus and the OOD corpus "
                                 f"of another domain evaluated with it)")
        name = _check_name(item.get("name", _dir_name(item["data_source"])), here)
        if name in names:
            raise StudyError(f"{here}: dataset name {name!r} is used twice")
        names.add(name)
        overrides = _fields(item.get("set"), f"{here}: set")
        for key, why in RESERVED.items():
            if key in overrides:
                raise StudyError(f"{here}: set: {key!r} cannot be set here ({why})")
        out.append(Dataset(name, item["data_source"].strip(), item["ood_source"].strip(), overrides))
    return tuple(out)


def _dir_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", source.strip()).strip("-") or "data"


def _variants(value: Any, where: str) -> tuple[Variant, ...]:
    if not isinstance(value, dict) or not value:
        raise StudyError(f"{where}: expected a mapping of variant name -> config fields, got {value!r}")
    out = []
    for name, overrides in value.items():
        here = f"{where}: {name}"
        _check_name(name, here)
        fields_ = _fields(overrides, here)
        for key, why in RESERVED.items():
            if key in fields_:
                raise StudyError(f"{here}: a variant cannot set {key!r} ({why})")
        out.append(Variant(name, fields_))
    return tuple(out)


def _smoke_variants(chosen: Any, variants: tuple[Variant, ...], where: str) -> tuple[Variant, ...]:
    """The smoke section's variants: a list of names (a subset), or a mapping
    name -> config fields added to that variant's (e.g. a size that has to
    shrink with the smoke model: ``initial_experts``)."""
    if isinstance(chosen, list):
        chosen = dict.fromkeys(chosen)
    if not isinstance(chosen, dict) or not chosen:
        raise StudyError(f"{where}: expected a non-empty list of variant names, or a mapping of variant names "
                         f"to extra config fields")
    known = {v.name: v for v in variants}
    out = []
    for name, extra in chosen.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise StudyError(f"{where}: unknown variant {name!r}{hint} (variants: {', '.join(known)})")
        fields_ = _fields(extra, f"{where}: {name}")
        for key, why in RESERVED.items():
            if key in fields_:
                raise StudyError(f"{where}: {name}: a variant cannot set {key!r} ({why})")
        out.append(Variant(name, {**known[name].overrides, **fields_}))
    return tuple(out)


def _measure(value: Any, where: str) -> Measure:
    value = _mapping(value, where)
    names = [f.name for f in dataclasses.fields(Measure)]
    _check_keys(value, names, where)
    for key, v in value.items():
        least = 0 if key == "latency_warmup" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise StudyError(f"{where}: {key} must be an integer >= {least}, got {v!r}")
    return Measure(**value)


def _check_corpora(study: Study) -> None:
    """Load every corpus once (cached by the data module): a missing package,
    file or program shows now, not after hours of training."""
    checked: set[str] = set()
    for ds in study.datasets:
        cache_dir = next(r.config.cache_dir for r in study.runs if r.dataset == ds.name)
        for role, source in (("data_source", ds.data_source), ("ood_source", ds.ood_source)):
            if source in checked:
                continue
            try:
                kind, arg = parse_source(source)
                if kind == "tinystories":  # (a local copy where the source names one)
                    load_tinystories("validation", 1, 0, **parse_tinystories_options(arg), cache_dir=cache_dir)
                else:
                    load_documents(source, cache_dir=cache_dir)
            except (CorpusUnavailableError, ValueError, OSError) as e:
                raise StudyError(f"{study.path}: dataset '{ds.name}': {role} {source!r} is not available: "
                                 f"{e}") from None
            checked.add(source)
