"""Running a study: every variant × dataset × seed, each run in its own process.

Each run trains in its own process (so that its peak memory is its own, and a
crash is contained) into ``OUT/runs/VARIANT/DATASET/seedS/`` (a normal run
directory, see :mod:`some.runs`), then measures the trained model and writes
``result.json`` there, last: a run with ``result.json`` is finished and is not
run again; one with a checkpoint is resumed. At the end (and whenever the study
is run again) :func:`~some.studies.summary.summarize` writes the tables and
pictures.

The child process is ``python -m some.studies _run SPEC.json`` (some/studies/__main__.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis import (
    analytic_flops_per_token,
    count_flops,
    current_rss_mb,
    dynamics_summary,
    entropy_bits,
    experts_used,
    gini,
    inference_latency,
    max_entropy_bits,
    memory_kind,
    peak_memory_mb,
    routing_pass,
    token_batch,
)
from ..construction import dense_cache_path, load_or_pretrain_dense
from ..data import build_data
from ..engine import autocast, pick_device, seed_everything
from ..errors import RunsFailed, StudyError
from ..files import write_json
from ..runs import CHECKPOINT, SoMEConfig, Trainer
from ..runs.dynamics import read_dynamics
from ..runs.specialization import SPECIALIZATION_FILE, specialization_analysis
from .schema import Measure, Run, Study, plural
from .summary import RESULT, summarize

__all__ = ["measure_run", "run_status", "run_study"]

log = logging.getLogger(__name__)


def run_status(run: Run, out: Path) -> str:
    """``done`` (result.json), ``partial`` (a checkpoint to resume) or ``new``;
    raises :class:`StudyError` when the run directory holds another
    configuration (the study file changed since it ran)."""
    run_dir = run.dir(out)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        diff = SoMEConfig.load_yaml(saved).diff(run.config)
        if diff:
            what = ", ".join(f"{k}: ran with {a!r}, study gives {b!r}" for k, (a, b) in diff.items())
            raise StudyError(f"{run_dir} was run with another configuration ({what}); the study file changed "
                             f"since. Delete that directory to re-run it, or choose another --out")
    if (run_dir / RESULT).is_file():
        return "done"
    return "partial" if (run_dir / CHECKPOINT).is_file() else "new"


def run_study(study: Study, out: str | Path | None = None, *, device: str = "auto", stream: bool = True) -> Path:
    """Run every unfinished run of ``study`` into ``out`` (each in its own
    process), then :func:`summarize`. Returns the path of ``results.md``.

    Runs that fail are reported and the others go on; the summary is written
    either way, and :class:`RunsFailed` names the failed runs at the end.
    """
    out = Path(out) if out is not None else study.default_out()
    status = {run.key: run_status(run, out) for run in study.runs}  # every stale directory shows before any training
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_study(study, out, status, device, stream)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One ``some ablate`` per output directory: two would train the same runs
    into the same directories."""
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another 'some ablate' is running into {out}; wait for it or choose another "
                             f"--out") from None
        yield


def _run_study(study: Study, out: Path, status: dict, device: str, stream: bool) -> Path:
    shutil.copyfile(study.path, out / "study.yaml")
    todo = [run for run in study.runs if status[run.key] != "done"]
    log.info(f"Study '{study.name}'{' (smoke)' if study.smoke else ''}: {plural(len(study.variants), 'variant')} x "
        f"{plural(len(study.datasets), 'dataset')} x {plural(len(study.seeds), 'seed')} = {len(study.runs)} runs; "
        f"{len(study.runs) - len(todo)} finished, {len(todo)} to run; output {out}")

    t_study = time.perf_counter()
    failed: list[str] = []
    _prepare_dense_models(study, todo, out, device, stream, failed)
    for i, run in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {run.variant} / {run.dataset} / seed {run.seed}"
        if status[run.key] == "partial":
            label += " (resuming)"
        log.info(label)
        t0 = time.perf_counter()
        rc = _run_in_subprocess(run, out, study, device, stream)
        if rc == 0 and (run.dir(out) / RESULT).is_file():
            res = json.loads((run.dir(out) / RESULT).read_text())
            log.info(f"    done in {time.perf_counter() - t0:.0f} s: ID PPL {res['id_perplexity']:.2f}, "
                f"OOD PPL {res['ood_perplexity']:.2f}")
        else:
            failed.append(f"{run.variant}/{run.dataset}/seed{run.seed} (exit code {rc}, log {_log_path(run, out)})")
            log.info(f"    FAILED (exit code {rc}); see {_log_path(run, out)}")
    if todo:
        log.info(f"Ran {len(todo)} runs in {time.perf_counter() - t_study:.0f} s")
    report = summarize(study, out)
    log.info(f"Results: {report}")
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(study.runs)} runs failed: " + "; ".join(failed))
    return report


def _log_path(run: Run, out: Path) -> Path:
    return run.dir(out).with_name(run.dir(out).name + ".log")


def _spec_path(run: Run, out: Path) -> Path:
    return run.dir(out).with_name(run.dir(out).name + ".spec.json")


def _run_in_subprocess(run: Run, out: Path, study: Study, device: str, echo: bool) -> int:
    spec = {"config": run.config.to_dict(), "run_dir": str(run.dir(out)), "device": device,
            "measure": dataclasses.asdict(study.measure), "run_plots": study.run_plots,
            "keep_checkpoints": study.keep_checkpoints,
            "labels": {"study": study.name, "variant": run.variant, "dataset": run.dataset, "seed": run.seed}}
    spec_path = _spec_path(run, out)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return _child([sys.executable, "-m", "some.studies", "_run", str(spec_path)], _log_path(run, out), echo)


def _child(cmd: list[str], log_path: Path, echo: bool) -> int:
    """Run ``cmd``, its output appended to ``log_path`` (and logged, indented, with ``echo``)."""
    with open(log_path, "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                logf.write(line)
                if echo and not _is_build_noise(line):
                    log.info("    | " + line.rstrip())
        except BaseException:
            proc.terminate()  # our own child: do not leave it training on its own
            proc.wait()
            raise
        return proc.wait()


def _is_build_noise(line: str) -> bool:
    # an editable install re-checks its build on import and prints cmake/ninja lines
    return line.startswith(("Running cmake", "ninja:", "-- Install configuration", "-- Up-to-date", "-- Installing"))


def _prepare_dense_models(study: Study, todo: list[Run], out: Path, device: str, stream: bool,
                          failed: list[str]) -> None:
    """Pre-train the dense models that pending runs need, each in its own
    process, so that a run's measured peak memory is its own training's."""
    needed: dict[Path, Run] = {}
    for run in todo:
        if run.config.expert_init == "cluster" and run.config.dense_source == "pretrained":
            needed.setdefault(dense_cache_path(run.config), run)
    for path, run in needed.items():
        if path.is_file():
            continue
        log.info(f"Pre-training the dense model for {run.dataset} / seed {run.seed} (cached as {path})")
        spec_path = out / "dense" / f"{path.stem}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({"config": run.config.to_dict(), "device": device}, indent=2) + "\n")
        rc = _child([sys.executable, "-m", "some.studies", "_dense", str(spec_path)],
                    spec_path.with_suffix(".log"), stream)
        if rc != 0:  # the runs that need it will try again themselves and fail with their own log
            failed.append(f"dense pre-training {path.stem} (exit code {rc}, log {spec_path.with_suffix('.log')})")


# ------------------------------------------------------------ one run (child)


def _child_run(spec_path: str) -> int:
    """Train one run (or resume it) and measure the trained model."""
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
    write_json(run_dir / RESULT, result)
    if not spec["keep_checkpoints"]:
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the study needs result.json only (A4: 2.8 GB each)
    print(f"Measured: {json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))})}")
    return 0


def measure_run(trainer, measure: Measure) -> dict[str, Any]:
    """Everything the study table reports about one trained run (a dense control: no expert metrics)."""
    cfg, model, data, device = trainer.config, trainer.model, trainer.data, trainer.device
    history = trainer.history
    last = history[-1]
    seconds = [r["timing"]["epoch_seconds"] for r in history if (r.get("timing") or {}).get("epoch_seconds")]
    # training throughput over the epochs this process timed (input positions, padding included)
    tokens = trainer.steps_per_epoch * cfg.batch_size * cfg.seq_len * len(seconds)
    experts = _expert_measures(trainer) if trainer.middle is not None else {}

    flops_ids = token_batch(data.val, measure.flops_rows, cfg.seq_len).to(device)
    counted = count_flops(model, flops_ids)
    analytic = analytic_flops_per_token(cfg, experts.get("experts_per_token_by_layer", cfg.top_k))
    lat_ids = token_batch(data.val, measure.latency_batch, cfg.seq_len).to(device)
    with autocast(device, cfg.precision):
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
        "ffn": cfg.ffn, "num_experts": cfg.num_experts if cfg.ffn == "some" else None,
        **experts,
        "parameters": trainer.run_info["parameters"],
        "torch": torch.__version__,
    }


def _expert_measures(trainer) -> dict[str, Any]:
    """The middle layer's routing on the validation set, its specialization and its dynamics."""
    cfg, model, data, device = trainer.config, trainer.model, trainer.data, trainer.device
    rp = trainer.final_routing  # the validation pass the run's report was made from
    if rp is None:
        with autocast(device, cfg.precision):  # as the model is evaluated
            rp = routing_pass(model, data.val, cfg.micro_batch_size, device)
    counts = rp.usage_counts[rp.layer]
    # every layer's specialization by token class, token id and topic (some.runs.specialization): the run's
    # specialization.json, written from that pass
    saved = trainer.out / SPECIALIZATION_FILE
    full_spec = json.loads(saved.read_text()) if trainer.final_routing is not None and saved.is_file() else \
        specialization_analysis(model, data, batch_size=cfg.micro_batch_size, device=device,
                                routing_level=cfg.routing_level, seed=cfg.seed, rp=rp, precision=cfg.precision)
    spec = {k: v for k, v in full_spec["layers"][rp.layer].items() if k != "layer"}
    return {
        "middle_layer": rp.layer,
        "experts_per_token": rp.experts_per_token[rp.layer], "experts_per_token_by_layer": rp.experts_per_token,
        "experts_used": experts_used(counts).used, "active_experts": rp.active_experts[rp.layer],
        "active_experts_by_layer": rp.active_experts,
        "gini": gini(counts), "entropy_bits": entropy_bits(counts),
        "max_entropy_bits": max_entropy_bits(cfg.num_experts),
        "usage_counts": counts.tolist(), "val_tokens": rp.real_tokens,
        **{f"spec_{k}": v for k, v in spec.items()},
        "spec_by_layer": full_spec["layers"], "spec_topic_names": full_spec["topic_names"],
        "spec_topic_matrix": full_spec.get("topic_matrix"), "spec_class_matrix": full_spec["class_matrix"],
        # the middle layer's routing dynamics during training (dynamics.jsonl)
        **{f"dyn_{k}": v for k, v in dynamics_summary(read_dynamics(trainer.out), rp.layer).items()},
    }


def _child_dense(spec_path: str) -> int:
    """Pre-train (and cache) the dense model of a configuration."""
    spec = json.loads(Path(spec_path).read_text())
    config = SoMEConfig.from_dict(spec["config"], source=spec_path)
    seed_everything(config.seed)
    data = build_data(config.data_config())
    load_or_pretrain_dense(config, data, pick_device(spec["device"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The child processes of a study: ``_run SPEC`` (one run) or ``_dense SPEC`` (a dense model)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"_run": _child_run, "_dense": _child_dense}
    if len(argv) != 2 or argv[0] not in commands:
        print("usage: python -m some.studies _run|_dense SPEC.json (started by 'some ablate')", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return commands[argv[0]](argv[1])
