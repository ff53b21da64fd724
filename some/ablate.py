"""Ablation studies (SPEC §7): run every variant × dataset × seed of a study
file and compare them in one table.

    some ablate experiments/gating.yaml                   # the full study (GPU-sized)
    some ablate experiments/gating.yaml --smoke           # its CPU smoke version, minutes
    some ablate experiments/gating.yaml --dry-run         # validate, list the runs, train nothing
    python -m some.ablate experiments/gating.yaml --smoke --out runs/gating-smoke

A study file (see ``experiments/README.md``)::

    study: gating
    preset: A4                      # the base configuration (some.config presets)
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
:class:`StudyError` naming the file and the place.

Each run trains in its own process (so that its peak memory is its own, and a
crash is contained) into ``OUT/runs/VARIANT/DATASET/seedS/`` (a normal run
directory, see :mod:`some.train`), then measures the trained model and writes
``result.json`` there, last: a run with ``result.json`` is finished and is not
run again; one with a checkpoint is resumed. At the end (and whenever the study
is run again) ``OUT`` gets ``runs.csv`` (one row per run), ``results.csv`` and
``results.md`` (one row per variant, with the Friedman ranks over the
dataset × seed blocks) and the comparison pictures.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PRESETS, ConfigError, SoMEConfig, _check_key, parse_value

__all__ = [
    "RESULT",
    "RunsFailed",
    "read_results",
    "Dataset",
    "Measure",
    "Run",
    "Study",
    "StudyError",
    "Variant",
    "add_arguments",
    "load_study",
    "main",
    "run_from_args",
    "run_study",
    "summarize",
]

RESULT = "result.json"  # written last into a run directory: the run is finished
STUDY_KEYS = ("study", "description", "preset", "set", "datasets", "seeds", "variants", "measure", "run_plots",
              "keep_checkpoints", "smoke")
SMOKE_KEYS = ("preset", "set", "datasets", "seeds", "variants", "measure", "run_plots")
DATASET_KEYS = ("name", "data_source", "ood_source", "set")
# What varies between the runs of a variant is the study's business, not the variant's.
RESERVED = {"seed": "seeds are the study's 'seeds'", "data_source": "corpora are the study's 'datasets'",
            "ood_source": "corpora are the study's 'datasets'"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # variant / dataset names are directory names


class StudyError(ConfigError):
    """A study file that cannot be run as written (or a run directory that
    belongs to another version of it); the message names the place."""


class RunsFailed(RuntimeError):
    """Some runs of a study failed (the others finished and are summarized);
    the message names each failed run and its log."""


# ------------------------------------------------------------------- the study


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
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"study file not found: {path}") from None
    except yaml.YAMLError as e:
        raise StudyError(f"study file {path} is not valid YAML: {e}") from None
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
    _check_one_sequence_batches(study)
    if check_corpora:
        _check_corpora(study)
    return study


def _check_one_sequence_batches(study: Study) -> None:
    # Sequence-level routing of a one-sequence batch hands ops.experts stride-0
    # (expanded) indices, and the CPU kernel reads a temporary contiguous copy
    # after freeing it (csrc/cpu/experts.cpp): the process crashes. Refuse the
    # measurement that would do that before any training, until the kernel is fixed.
    if any(r.config.routing_level == "sequence" for r in study.runs):
        for name in ("latency_batch", "flops_rows"):
            if getattr(study.measure, name) < 2:
                raise StudyError(f"{study.path}: measure: {name} = 1 with sequence-level routing: one-sequence "
                                 f"batches crash the CPU experts kernel (stride-0 indices); use 2 or more")


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
            _check_key(str(key), where)
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
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise StudyError(f"{where}: expected a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where}: a seed is listed twice: {value}")
    return tuple(value)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"{where}: name {name!r} must be letters, digits and _.+- (it names a directory)")
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
    from .data import CorpusUnavailableError, _parse_source, load_documents, load_tinystories

    checked: set[str] = set()
    for ds in study.datasets:
        cache_dir = next(r.config.cache_dir for r in study.runs if r.dataset == ds.name)
        for role, source in (("data_source", ds.data_source), ("ood_source", ds.ood_source)):
            if source in checked:
                continue
            try:
                if _parse_source(source)[0] == "tinystories":
                    load_tinystories("validation", 1, 0)
                else:
                    load_documents(source, cache_dir=cache_dir)
            except (CorpusUnavailableError, ValueError, OSError) as e:
                raise StudyError(f"{study.path}: dataset '{ds.name}': {role} {source!r} is not available: {e}") from None
            checked.add(source)


# -------------------------------------------------------------------- running


def run_status(run: Run, out: Path) -> str:
    """``done`` (result.json), ``partial`` (a checkpoint to resume) or ``new``;
    raises :class:`StudyError` when the run directory holds another
    configuration (the study file changed since it ran)."""
    run_dir = run.dir(out)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        diff = {k: v for k, v in SoMEConfig.load_yaml(saved).diff(run.config).items() if not k.startswith("debug_")}
        if diff:
            what = ", ".join(f"{k}: ran with {a!r}, study gives {b!r}" for k, (a, b) in diff.items())
            raise StudyError(f"{run_dir} was run with another configuration ({what}); the study file changed "
                             f"since. Delete that directory to re-run it, or choose another --out")
    if (run_dir / RESULT).is_file():
        return "done"
    from .train import CHECKPOINT

    return "partial" if (run_dir / CHECKPOINT).is_file() else "new"


def run_study(study: Study, out: str | Path | None = None, *, device: str = "auto",
              log: Callable[[str], None] = print, stream: bool = True) -> Path:
    """Run every unfinished run of ``study`` into ``out`` (each in its own
    process), then :func:`summarize`. Returns the path of ``results.md``.

    Runs that fail are reported and the others go on; the summary is written
    either way, and :class:`RunsFailed` names the failed runs at the end.
    """
    out = Path(out) if out is not None else study.default_out()
    status = {run.key: run_status(run, out) for run in study.runs}  # every stale directory shows before any training
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_study(study, out, status, device, log, stream)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One ``some ablate`` per output directory: two would train the same runs
    into the same directories."""
    import fcntl

    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another 'some ablate' is running into {out}; wait for it or choose another "
                             f"--out") from None
        yield


def _run_study(study: Study, out: Path, status: dict, device: str, log: Callable[[str], None],
               stream: bool) -> Path:
    shutil.copyfile(study.path, out / "study.yaml")
    todo = [run for run in study.runs if status[run.key] != "done"]
    log(f"Study '{study.name}'{' (smoke)' if study.smoke else ''}: {_count(len(study.variants), 'variant')} x "
        f"{_count(len(study.datasets), 'dataset')} x {_count(len(study.seeds), 'seed')} = {len(study.runs)} runs; "
        f"{len(study.runs) - len(todo)} finished, {len(todo)} to run; output {out}")

    t_study = time.perf_counter()
    failed: list[str] = []
    _prepare_dense_models(study, todo, out, device, log, stream, failed)
    for i, run in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {run.variant} / {run.dataset} / seed {run.seed}"
        if status[run.key] == "partial":
            label += " (resuming)"
        log(label)
        t0 = time.perf_counter()
        rc = _run_in_subprocess(run, out, study, device, log if stream else None)
        if rc == 0 and (run.dir(out) / RESULT).is_file():
            res = json.loads((run.dir(out) / RESULT).read_text())
            log(f"    done in {time.perf_counter() - t0:.0f} s: ID PPL {res['id_perplexity']:.2f}, "
                f"OOD PPL {res['ood_perplexity']:.2f}")
        else:
            failed.append(f"{run.variant}/{run.dataset}/seed{run.seed} (exit code {rc}, log {_log_path(run, out)})")
            log(f"    FAILED (exit code {rc}); see {_log_path(run, out)}")
    if todo:
        log(f"Ran {len(todo)} runs in {time.perf_counter() - t_study:.0f} s")
    report = summarize(study, out)
    log(f"Results: {report}")
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(study.runs)} runs failed: " + "; ".join(failed))
    return report


def _log_path(run: Run, out: Path) -> Path:
    return run.dir(out).with_name(run.dir(out).name + ".log")


def _spec_path(run: Run, out: Path) -> Path:
    return run.dir(out).with_name(run.dir(out).name + ".spec.json")


def _run_in_subprocess(run: Run, out: Path, study: Study, device: str,
                       echo: Callable[[str], None] | None) -> int:
    spec = {"config": run.config.to_dict(), "run_dir": str(run.dir(out)), "device": device,
            "measure": dataclasses.asdict(study.measure), "run_plots": study.run_plots,
            "keep_checkpoints": study.keep_checkpoints,
            "labels": {"study": study.name, "variant": run.variant, "dataset": run.dataset, "seed": run.seed}}
    spec_path = _spec_path(run, out)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return _child([sys.executable, "-m", "some.ablate", "_run", str(spec_path)], _log_path(run, out), echo)


def _child(cmd: list[str], log_path: Path, echo: Callable[[str], None] | None) -> int:
    """Run ``cmd``, its output appended to ``log_path`` (and echoed, indented)."""
    with open(log_path, "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                logf.write(line)
                if echo is not None and not _is_build_noise(line):
                    echo("    | " + line.rstrip())
        except BaseException:
            proc.terminate()  # our own child: do not leave it training on its own
            proc.wait()
            raise
        return proc.wait()


def _is_build_noise(line: str) -> bool:
    # an editable install re-checks its build on import and prints cmake/ninja lines
    return line.startswith(("Running cmake", "ninja:", "-- Install configuration", "-- Up-to-date", "-- Installing"))


def _prepare_dense_models(study: Study, todo: list[Run], out: Path, device: str, log, stream: bool,
                          failed: list[str]) -> None:
    """Pre-train the dense models that pending runs need, each in its own
    process, so that a run's measured peak memory is its own training's."""
    from .dense import dense_cache_path

    needed: dict[Path, Run] = {}
    for run in todo:
        if run.config.expert_init == "cluster" and run.config.dense_source == "pretrained":
            needed.setdefault(dense_cache_path(run.config), run)
    for path, run in needed.items():
        if path.is_file():
            continue
        log(f"Pre-training the dense model for {run.dataset} / seed {run.seed} (cached as {path})")
        spec_path = out / "dense" / f"{path.stem}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({"config": run.config.to_dict(), "device": device}, indent=2) + "\n")
        rc = _child([sys.executable, "-m", "some.ablate", "_dense", str(spec_path)], spec_path.with_suffix(".log"),
                    log if stream else None)
        if rc != 0:  # the runs that need it will try again themselves and fail with their own log
            failed.append(f"dense pre-training {path.stem} (exit code {rc}, log {spec_path.with_suffix('.log')})")


# ------------------------------------------------------------ one run (child)


def _child_run(spec_path: str) -> int:
    """Train one run (or resume it) and measure the trained model."""
    import torch

    from .analysis import current_rss_mb, memory_kind, peak_memory_mb
    from .train import CHECKPOINT, Trainer

    baseline = current_rss_mb()  # Python, PyTorch and the extension, before any data or model
    spec = json.loads(Path(spec_path).read_text())
    config = SoMEConfig.from_dict(spec["config"], source=spec_path)
    run_dir = Path(spec["run_dir"])
    resume = (run_dir / CHECKPOINT).is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # died before its first checkpoint: start again
    trainer = Trainer(config, run_dir, resume=resume, device=spec["device"], progress=False)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.run(make_plots=spec["run_plots"])
    peak = peak_memory_mb(trainer.device)  # before measuring: the peak of training
    result = {**spec["labels"], "device": str(trainer.device), "threads": torch.get_num_threads(),
              "peak_memory_mb": peak, "memory_kind": memory_kind(trainer.device), "baseline_rss_mb": baseline,
              "resumed": resume,
              **measure_run(trainer, Measure(**spec["measure"]))}
    dense = run_dir / "dense.json"
    if dense.is_file():
        result["dense"] = json.loads(dense.read_text())
    tmp = run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, run_dir / RESULT)
    if not spec["keep_checkpoints"]:
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the study needs result.json only (A4: 2.8 GB each)
    print(f"Measured: {json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))})}")
    return 0


def measure_run(trainer, measure: Measure) -> dict[str, Any]:
    """Everything the study table reports about one trained run."""
    import torch

    from .analysis import (analytic_flops_per_token, count_flops, inference_latency, routing_pass, specialization,
                           token_batch, token_classes)
    from .metrics import entropy_bits, experts_used, gini, max_entropy_bits
    from .train import _autocast

    cfg, model, data, device = trainer.config, trainer.model, trainer.data, trainer.device
    history = trainer.pos.history
    last = history[-1]
    seconds = [r["timing"]["epoch_seconds"] for r in history if (r.get("timing") or {}).get("epoch_seconds")]
    # training throughput over the epochs this process timed (input positions, padding included)
    tokens = trainer.steps_per_epoch * cfg.batch_size * cfg.seq_len * len(seconds)

    with _autocast(device):  # as the model is evaluated (bf16 on CUDA)
        rp = routing_pass(model, data.val, cfg.batch_size // cfg.grad_accum, device)
    counts = rp.usage_counts[rp.layer]
    spec = specialization(rp.experts, rp.tokens, token_classes(data.tokenizer, cfg.vocab_size), seed=cfg.seed)

    flops_ids = token_batch(data.val, measure.flops_rows, cfg.seq_len).to(device)
    counted = count_flops(model, flops_ids)
    analytic = analytic_flops_per_token(cfg, rp.experts_per_token)
    lat_ids = token_batch(data.val, measure.latency_batch, cfg.seq_len).to(device)
    with _autocast(device):
        latency = inference_latency(model, lat_ids, repeats=measure.latency_repeats, warmup=measure.latency_warmup)
    return {
        "id_loss": last["val_loss"], "id_perplexity": last["val_perplexity"],
        "ood_loss": last["ood_loss"], "ood_perplexity": last["ood_perplexity"],
        "train_loss": last["train_loss"], "epochs": len(history), "steps": last["step"],
        "train_tokens_per_s": tokens / sum(seconds) if seconds else None,
        "train_seconds": sum(seconds),
        "flops_per_token_analytic": analytic["total"],
        "flops_per_token_counted": counted["total"] / flops_ids.numel(),
        "flops_analytic_parts": analytic, "flops_counted_by_op": counted, "flops_tokens": flops_ids.numel(),
        "latency_ms": latency["median_ms"], "latency": latency, "latency_shape": list(lat_ids.shape),
        "middle_layer": rp.layer, "num_experts": cfg.num_experts,
        "experts_per_token": rp.experts_per_token[rp.layer], "experts_per_token_by_layer": rp.experts_per_token,
        "experts_used": experts_used(counts).used, "active_experts": rp.active_experts[rp.layer],
        "active_experts_by_layer": rp.active_experts,
        "gini": gini(counts), "entropy_bits": entropy_bits(counts), "max_entropy_bits": max_entropy_bits(cfg.num_experts),
        "usage_counts": counts.tolist(), "val_tokens": rp.real_tokens,
        **{f"spec_{k}": v for k, v in spec.items()},
        "parameters": trainer.run_info["parameters"],
        "torch": torch.__version__,
    }


def _child_dense(spec_path: str) -> int:
    """Pre-train (and cache) the dense model of a configuration."""
    from .data import build_data
    from .dense import load_or_pretrain_dense
    from .train import pick_device, seed_everything

    spec = json.loads(Path(spec_path).read_text())
    config = SoMEConfig.from_dict(spec["config"], source=spec_path)
    seed_everything(config.seed)
    data = build_data(config.data_config())
    load_or_pretrain_dense(config, data, pick_device(spec["device"]))
    return 0


# -------------------------------------------------------------------- summary

# (key in result.json, header, format) of the per-variant table; perplexities come per dataset.
_COLUMNS = [
    ("flops_per_token_analytic", "MFLOPs/token (analytic)", "{:.4g}", 1e-6),
    ("flops_per_token_counted", "MFLOPs/token (counted)", "{:.4g}", 1e-6),
    ("peak_memory_mb", "Peak memory (MiB)", "{:,.0f}", 1),
    ("train_tokens_per_s", "Train tok/s", "{:,.0f}", 1),
    ("latency_ms", "Latency (ms)", "{:.3g}", 1),
    ("experts_per_token", "Experts/token", "{:.3g}", 1),
    ("experts_used", "Experts used", "{:.4g}", 1),
    ("active_experts", "Active experts", "{:.4g}", 1),
    ("gini", "Gini", "{:.3f}", 1),
    ("entropy_bits", "Entropy (bits)", "{:.3f}", 1),
    ("spec_mi_class_bits", "MI(expert; token class) (bits)", "{:.3f}", 1),
    ("spec_mi_token_excess_bits", "MI(expert; token) excess (bits)", "{:.3f}", 1),
]


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished run under a study's output
    directory (no study file needed), each with its ``history`` (the run's
    ``metrics.jsonl``) and ``run_dir`` added; sorted by variant order of
    ``results.csv`` when there is one, then dataset and seed."""
    out = Path(out)
    rows = []
    for path in sorted(out.glob(f"runs/*/*/seed*/{RESULT}")):
        row = json.loads(path.read_text())
        metrics = path.parent / "metrics.jsonl"
        row["history"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.is_file() else []
        row["run_dir"] = str(path.parent)
        rows.append(row)
    order: dict[str, int] = {}
    if (out / "results.csv").is_file():
        with open(out / "results.csv", newline="") as f:
            order = {r["variant"]: i for i, r in enumerate(csv.DictReader(f))}
    return sorted(rows, key=lambda r: (order.get(r["variant"], len(order)), r["dataset"], r["seed"]))


def _load_results(study: Study, out: Path) -> tuple[list[dict[str, Any]], list[Run]]:
    rows, missing = [], []
    for run in study.runs:
        path = run.dir(out) / RESULT
        if path.is_file():
            rows.append(json.loads(path.read_text()))
        else:
            missing.append(run)
    return rows, missing


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value: no spread to show)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def summarize(study: Study, out: str | Path) -> Path:
    """Write ``runs.csv``, ``results.csv``, ``results.md`` and the pictures of
    the finished runs in ``out``; returns the path of ``results.md``."""
    from .stats import friedman

    out = Path(out)
    rows, missing = _load_results(study, out)
    variants = [v.name for v in study.variants]
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in variants}

    # ---- runs.csv: one row per run, every scalar measured
    scalar_keys = [k for k in (rows[0] if rows else {}) if not isinstance(rows[0][k], (list, dict))]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    # ---- Friedman ranks over the complete dataset × seed blocks
    ranks: dict[str, Any] = {}
    for metric in ("id_perplexity", "ood_perplexity"):
        blocks: dict[str, dict[str, float]] = {}
        for r in rows:
            blocks.setdefault(f"{r['dataset']}/seed{r['seed']}", {})[r["variant"]] = r[metric]
        complete = {b: s for b, s in blocks.items() if set(s) == set(variants)}
        ranks[metric] = friedman(complete, variants=variants) if complete else None

    # ---- per-variant table
    table: list[dict[str, Any]] = []
    for v in variants:
        rs = by_variant[v]
        row: dict[str, Any] = {"variant": v, "runs": len(rs),
                               "num_experts": rs[0]["num_experts"] if rs else math.nan}
        for ds in study.datasets:
            for metric in ("id_perplexity", "ood_perplexity"):
                vals = [r[metric] for r in rs if r["dataset"] == ds.name]
                row[f"{metric}[{ds.name}]"], row[f"{metric}_std[{ds.name}]"] = _mean_std(vals) if vals else (math.nan, math.nan)
        for key, *_ in _COLUMNS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = _mean_std(vals)[0] if vals else math.nan
        for metric in ("id_perplexity", "ood_perplexity"):
            fr = ranks[metric]
            row[f"rank_{metric}"] = fr.avg_ranks[v] if fr is not None else math.nan
        table.append(row)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)

    pictures = _pictures(study, out, table, by_variant)
    text = _markdown(study, out, rows, table, ranks, missing, pictures)
    (out / "results.md").write_text(text)
    return out / "results.md"


def _construction_section(study: Study, rows) -> list[str]:
    """Where the experts came from, for variants with expert_init = cluster:
    the dense model's own perplexity and the clustering's cost and balance."""
    built = [r for r in rows if r.get("dense")]
    if not built:
        return []
    lines = ["## Expert construction", "",
             "| Variant | Dense source | Dense model val PPL | Clustering (s, all layers) | Cluster sizes before "
             "rebalancing | Neurons moved per layer |", "|---|---|---|---|---|---|"]
    for v in study.variants:
        rs = [r["dense"] for r in built if r["variant"] == v.name]
        if not rs:
            continue
        dense_ppl = [d["dense"]["val_perplexity"] for d in rs if "dense" in d]
        seconds = [sum(layer["seconds"] for layer in d["layers"]) for d in rs]
        lo = min(layer["raw_size_min"] for d in rs for layer in d["layers"])
        hi = max(layer["raw_size_max"] for d in rs for layer in d["layers"])
        moved = [layer["n_moved"] for d in rs for layer in d["layers"]]
        source = rs[0]["dense_source"] + (f" (transfer: {rs[0]['dense_transfer']})"
                                          if rs[0]["dense_source"] == "pretrained" else "")
        lines.append(f"| `{v.name}` | {source} | "
                     f"{_cell(*_mean_std(dense_ppl), fmt='{:.2f}') if dense_ppl else 'n/a (not pre-trained)'} | "
                     f"{np.mean(seconds):.2f} | {lo}..{hi} | {np.mean(moved):.0f} |")
    return lines + ["", "Clustering time is part of each run's process (and of its peak memory); the dense "
                        "model is pre-trained once per dataset × seed in a process of its own and cached.", ""]


def _baseline_note(rows) -> str:
    base = [r["baseline_rss_mb"] for r in rows if r.get("baseline_rss_mb") is not None
            and math.isfinite(r["baseline_rss_mb"]) and r["memory_kind"].startswith("peak RSS")]
    if not base:
        return ""
    return (f" (a CPU process's RSS includes Python, PyTorch and the extension: {np.mean(base):,.0f} MiB on average "
            f"before any data or model was built)")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _cell(value: float, std: float | None = None, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = fmt.format(value * scale)
    if std is not None and math.isfinite(std):
        text += " ± " + fmt.format(std * scale)
    return text


def _markdown(study: Study, out: Path, rows, table, ranks, missing, pictures: list[tuple[str, str]]) -> str:
    kinds = sorted({r["memory_kind"] for r in rows})
    devices = sorted({r["device"] for r in rows})
    lines = [f"# Ablation study `{study.name}`{' (smoke)' if study.smoke else ''}", ""]
    if study.description:
        lines += [study.description, ""]
    if study.smoke:
        lines += ["*Smoke version* (the file's `smoke` section: a tiny model, a few steps): it checks that the "
                  "study runs end to end and every column is measured; its numbers are not results.", ""]
    lines += [(f"Study file `{study.path}`; preset `{study.preset}`; {_count(len(study.variants), 'variant')} × "
               f"{_count(len(study.datasets), 'dataset')} × {_count(len(study.seeds), 'seed')} "
               f"({', '.join(map(str, study.seeds))}); {len(rows)} of {len(study.runs)} runs finished; "
               f"device {', '.join(devices) or 'n/a'}."), ""]

    head = ["Variant"]
    for ds in study.datasets:
        suffix = f" {ds.name}" if len(study.datasets) > 1 else ""
        head += [f"ID PPL{suffix}", f"OOD PPL{suffix}"]
    for key, title, *_ in _COLUMNS:
        head.append(f"Peak memory (MiB, {' / '.join(kinds) or 'n/a'})" if key == "peak_memory_mb" else title)
    head += ["Friedman rank (ID PPL)", "Friedman rank (OOD PPL)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [f"`{row['variant']}`"]
        for ds in study.datasets:
            for metric in ("id_perplexity", "ood_perplexity"):
                cells.append(_cell(row[f"{metric}[{ds.name}]"], row[f"{metric}_std[{ds.name}]"], "{:.2f}"))
        for key, _, fmt, scale in _COLUMNS:
            cell = _cell(row[key], fmt=fmt, scale=scale)
            if key in ("experts_used", "active_experts") and cell != "n/a":
                cell += f" / {row['num_experts']}"  # of N (scale studies vary N)
            cells.append(cell)
        for metric in ("id_perplexity", "ood_perplexity"):
            cells.append(_cell(row[f"rank_{metric}"], fmt="{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for metric, what in (("id_perplexity", "ID"), ("ood_perplexity", "OOD")):
        fr = ranks[metric]
        if fr is None:
            lines.append(f"Friedman test ({what} perplexity): n/a: no dataset × seed block has every variant finished.")
        elif fr.p_value is None:
            lines.append(f"Friedman test ({what} perplexity, {fr.n_blocks} blocks): n/a: {fr.reason}.")
        else:
            lines.append(f"Friedman test ({what} perplexity, {fr.n_variants} variants, {fr.n_blocks} dataset × seed "
                         f"blocks): χ² = {fr.statistic:.3f}, **p = {fr.p_value:.3g}**.")
        lines.append("")
    if missing:
        lines += [f"**Unfinished runs ({len(missing)})**, not in the table: "
                  + ", ".join(f"{r.variant}/{r.dataset}/seed{r.seed}" for r in missing), ""]

    lines += _construction_section(study, rows)
    lines += ["## How each column is measured", "",
              "- **ID / OOD PPL**: exp of the mean next-token loss over the real tokens of the validation set / "
              "of the OOD corpus after the last epoch; mean ± standard deviation over seeds."
              + "".join(f" `{ds.name}`: ID `{ds.data_source}`, OOD `{ds.ood_source}`." for ds in study.datasets),
              "- **MFLOPs/token**: forward FLOPs per token (a multiply-add = 2; matrix products only, attention as the "
              "full S×S product, S = seq_len), analytic from the architecture with the measured experts per token of "
              "each layer, and counted with `torch.utils.flop_counter.FlopCounterMode` (the SoME ops register their "
              "formulas) on a forward of real validation tokens without padding.",
              f"- **Peak memory**: of each run's training, which runs in its own process: "
              f"{'; '.join(kinds) or 'n/a'}" + _baseline_note(rows) + ".",
              "- **Train tok/s**: input positions (padding included) per second of training, over the epochs.",
              "- **Latency**: median wall time of one eval-mode forward of "
              f"{study.measure.latency_batch} × seq_len real tokens, over {study.measure.latency_repeats} timed "
              f"passes after {study.measure.latency_warmup} untimed.",
              "- **Experts/token, experts used, active experts, Gini, entropy**: middle layer (L // 2), over the "
              "validation tokens after training; active = experts routing may select (the adaptive process masks "
              "some out; N otherwise).",
              "- **MI(expert; token class)**: mutual information in bits between the expert id and the class of the "
              "token it receives (special / whitespace / punctuation / digits / word start / word piece), over "
              "(token, selected expert) pairs of the middle layer on the validation set. **MI(expert; token) "
              "excess**: the same with the token id, minus its value with the token ids shuffled across pairs (the "
              "finite-sample bias of the plug-in estimate).",
              "- **Friedman rank**: average rank of the variant (1 = lowest perplexity) over the dataset × seed "
              "blocks; the Friedman test's p-value is under the table.", ""]

    lines += ["## Variants", "", "| Variant | Config fields it sets |", "|---|---|"]
    for v in study.variants:
        sets = ", ".join(f"`{k}={val}`" for k, val in v.overrides.items()) or "(the base configuration)"
        lines.append(f"| `{v.name}` | {sets} |")
    lines.append("")
    if pictures:
        lines += ["## Pictures", ""]
        for name, caption in pictures:
            lines += [f"![{caption}]({name})", ""]
    lines += ["Run directories: `runs/VARIANT/DATASET/seedS/` (report.md, metrics.jsonl, result.json); one row per "
              "run in `runs.csv`, this table in `results.csv`.", ""]
    return "\n".join(lines)


def _pictures(study: Study, out: Path, table, by_variant) -> list[tuple[str, str]]:
    from .plots import comparison_bars

    pics = []
    for ds in study.datasets:
        runs = {v: [r for r in rs if r["dataset"] == ds.name] for v, rs in by_variant.items()}
        if any(runs.values()):
            name = f"perplexity_{ds.name}.png"
            perplexity_plot(runs, out / name, title=f"{study.name}: perplexity per variant (ID {ds.data_source}, "
                                                    f"OOD {ds.ood_source})")
            pics.append((name, f"Perplexity per variant, {ds.name}"))
    counts = {}
    for v, rs in by_variant.items():
        first = sorted(rs, key=lambda r: (r["dataset"] != study.datasets[0].name, r["seed"]))
        if first:
            counts[v] = np.asarray(first[0]["usage_counts"], dtype=np.float64)
    if counts:
        ds0, seed0 = study.datasets[0].name, study.seeds[0]
        usage_grid(counts, out / "usage.png",
                   title=f"{study.name}: expert usage of the middle layer on the validation set ({ds0}, seed {seed0})")
        pics.append(("usage.png", "Expert usage per variant"))
    mi = {row["variant"]: row["spec_mi_class_bits"] for row in table}
    if any(math.isfinite(x) for x in mi.values()):
        comparison_bars(mi, out / "specialization.png", ylabel="bits", fmt="{:.3f}",
                        title=f"{study.name}: MI(expert; token class), middle layer, mean over runs "
                              f"(higher = more specialized)")
        pics.append(("specialization.png", "Expert specialization"))
    return pics


def perplexity_plot(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """ID and OOD perplexity per variant side by side: one dot per run (seed)
    and the mean with ± std whiskers; the axes zoom to the data, since
    variants often differ by a few percent."""
    from .plots import COLOR_BEST, COLOR_USED, new_figure, save_figure

    names = list(runs)
    fig = new_figure(max(7.0, 1.4 * len(names) + 3), 4.2)
    for ax, metric, what in zip(fig.subplots(1, 2), ("id_perplexity", "ood_perplexity"), ("ID", "OOD"), strict=True):
        means = []
        for i, v in enumerate(names):
            vals = np.array([r[metric] for r in runs[v]], dtype=np.float64)
            if vals.size == 0:
                means.append(math.nan)
                continue
            jitter = np.linspace(-0.12, 0.12, vals.size) if vals.size > 1 else np.zeros(1)
            ax.scatter(i + jitter, vals, s=14, color=COLOR_USED, alpha=0.6, zorder=2)
            std = vals.std(ddof=1) if vals.size > 1 else 0.0
            ax.errorbar(i, vals.mean(), yerr=std, fmt="_", color="black", markersize=18, capsize=5, zorder=3)
            means.append(float(vals.mean()))
        if np.isfinite(means).any():
            best = int(np.nanargmin(means))
            ax.axhline(means[best], color=COLOR_BEST, linestyle="--", linewidth=1, label=f"best mean: {names[best]}")
            ax.legend(fontsize=7, loc="best")
        rotate = len(names) > 4 or max(map(len, names)) > 10
        ax.set_xticks(range(len(names)), names, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(f"{what} perplexity (lower is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{what}: dots = seeds, black = mean ± std", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def usage_grid(counts: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Expert usage of several variants side by side: per variant the usage
    counts sorted from most to least used (log scale), unused experts as red
    ticks on the axis, with Gini, entropy and experts used in the panel title."""
    from .metrics import entropy_bits, experts_used, gini
    from .plots import COLOR_BEST, COLOR_UNUSED, COLOR_USED, new_figure, save_figure

    n = len(counts)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = new_figure(4.2 * cols, 3.2 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    positive = [c[c > 0] for c in counts.values() if np.any(c > 0)]
    top = max(float(c.max()) for c in positive) if positive else 1.0
    bottom = min(float(c.min()) for c in positive) if positive else 1.0
    for ax, (name, c) in zip(axes, counts.items(), strict=False):  # spare axes are hidden below
        order = np.sort(c)[::-1]
        x = np.arange(1, c.size + 1)
        used = order > 0
        ax.bar(x[used], order[used], width=1.0, color=COLOR_USED, edgecolor="none")
        if (~used).any():
            ax.plot(x[~used], np.full((~used).sum(), bottom / 1.6), "|", color=COLOR_UNUSED, markersize=8,
                    label=f"unused: {(~used).sum()}")
            ax.legend(loc="upper right", fontsize=7)
        ax.axhline(c.sum() / c.size, color=COLOR_BEST, linestyle="--", linewidth=1)  # balanced routing
        ax.set_yscale("log")
        ax.set_ylim(bottom / 2.5, top * 1.6)
        ax.set_title(f"{name}\nGini {gini(c):.3f}, H {entropy_bits(c):.2f} bits, used {experts_used(c)}", fontsize=9)
        ax.set_xlabel("expert (by usage rank)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:: cols]:
        ax.set_ylabel("selections (log)", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n(dashed: balanced routing, Σc / N)", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study file, e.g. experiments/gating.yaml")
    p.add_argument("--smoke", action="store_true", help="run the file's 'smoke' section (CPU, minutes)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/ablations/STUDY[-smoke])")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--dry-run", action="store_true", help="validate the study and list its runs; train nothing")
    p.add_argument("--summarize", action="store_true",
                   help="only rebuild results.md/csv and the pictures from the finished runs")
    p.add_argument("--quiet", action="store_true", help="one line per run instead of every run's log")


def run_from_args(args: argparse.Namespace) -> int:
    study = load_study(args.study, smoke=args.smoke, check_corpora=not args.summarize)
    out = Path(args.out) if args.out else study.default_out()
    if args.dry_run:
        for run in study.runs:
            print(f"{run_status(run, out):8s} {run.dir(out)}")
        print(f"{len(study.runs)} runs; the study file is valid")
        return 0
    if args.summarize:
        print(summarize(study, out))
        return 0
    try:
        run_study(study, out, device=args.device, stream=not args.quiet)
    except KeyboardInterrupt:
        print("\nsome: interrupted; run the same command again to continue (finished runs are kept)",
              file=sys.stderr)
        return 130
    except RunsFailed as e:
        print(f"some: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_run"] and len(argv) == 2:  # internal: one run, in a child process
        return _child_run(argv[1])
    if argv[:1] == ["_dense"] and len(argv) == 2:
        return _child_dense(argv[1])
    parser = argparse.ArgumentParser(prog="python -m some.ablate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .data import CorpusUnavailableError

    try:
        return run_from_args(args)
    except (ConfigError, CorpusUnavailableError, FileNotFoundError) as e:  # the user's to fix: one line
        print(f"some: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
