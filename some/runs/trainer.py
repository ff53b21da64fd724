"""Train a SoME language model into a run directory (docs/method.md §6).

    some train --preset tiny --out runs/tiny          # the command
    some.train(get_preset("tiny"), "runs/tiny")       # the same from Python

The :class:`Trainer` only sequences parts that each have one job: the run
directory (:class:`~some.runs.rundir.RunDirectory`: where a run may start,
its log and files), the data-parallel context
(:class:`~some.engine.DataParallel`), the model builder
(:func:`~some.runs.build.build_model`), the optimizer step shared with the
dense pre-training (:func:`~some.engine.train_step`, which also self-organizes
the key stores), the :class:`~some.runs.checkpointer.Checkpointer`, the per-epoch
:class:`EpochEvaluator`, the final analysis and report
(:mod:`some.runs.report`), and the test suite's fault injection
(:class:`~some.runs.faults.Faults`).

Resuming is exact: the checkpoint holds the model (with key stores), the
optimizer, every RNG state and the data position, so a resumed CPU run is
bit-identical to an uninterrupted one.

On a CPU shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: spinning
OpenMP threads made `tiny` 10x slower on 2 busy cores (same results).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import ops
from ..analysis import RoutingPass, entropy_bits, gini, routing_pass
from ..data import build_data, collate, epoch_order
from ..engine import (
    DataParallel,
    autocast,
    evaluate,
    load_checkpoint,
    lr_at,
    make_optimizer,
    pick_device,
    resolve_precision,
    seed_everything,
    train_step,
)
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..nn import SoMEForCausalLM, format_parameter_counts, warn_if_methods_changed
from ..version import __version__
from .build import build_model
from .checkpointer import Checkpointer, Progress
from .config import SoMEConfig
from .dynamics import DynamicsLog
from .export import MODEL_DIR, export_model
from .faults import Faults
from .report import finish_run
from .rundir import RunDirectory

__all__ = ["EpochEvaluator", "RunResult", "Trainer", "train"]

log = logging.getLogger(__name__)

# Fields that may differ between a run and its resumption: they change how the
# run is executed, not what it computes.
RESUMABLE_CHANGES = ("dist_timeout", "ops_backend", "tensorboard", "compile")


@dataclass
class RunResult:
    out_dir: Path
    history: list[dict[str, Any]]  # one record per epoch (metrics.jsonl)
    analysis: dict[str, Any] | None  # middle-layer utilization at the end


class EpochEvaluator:
    """The end-of-epoch record of docs/method.md §6: validation loss and perplexity, OOD
    perplexity, and the middle layer's usage metrics on the validation set."""

    def __init__(self, config: SoMEConfig, data, device: torch.device, parallel: DataParallel, middle: int | None):
        self.config, self.data, self.device, self.parallel, self.middle = config, data, device, parallel, middle

    def __call__(self, model: SoMEForCausalLM) -> tuple[dict[str, Any], torch.Tensor | None]:
        batch, how = self.config.micro_batch_size, dict(dist_ctx=self.parallel.ctx, precision=self.config.precision)
        val = evaluate(model, self.data.val, batch, self.device, self.middle, **how)
        counts = val.usage_counts
        record: dict[str, Any] = {"val_loss": val.loss, "val_perplexity": val.perplexity, "middle_layer": self.middle,
                                  "gini": None if counts is None else float(gini(counts)),
                                  "entropy": None if counts is None else float(entropy_bits(counts))}
        if self.data.ood is not None:
            ood = evaluate(model, self.data.ood, batch, self.device, **how)
            record.update(ood_loss=ood.loss, ood_perplexity=ood.perplexity)
        return record, val.usage_counts


class Trainer:
    """One training run in ``out_dir``. Use :func:`train` unless you need the parts.

    ``faults`` injects test faults (default: from the ``SOME_FAULT_*``
    environment variables, all off when they are unset).
    """

    def __init__(self, config: SoMEConfig | None, out_dir: str | Path, *, resume: bool = False,
                 device: str | torch.device = "auto", progress: bool | None = None, echo: bool = True,
                 faults: Faults | None = None):
        self.device = pick_device(device)
        self.progress_bar = progress
        self.echo = echo
        self.faults = faults if faults is not None else Faults.from_env()
        self._pending_checks: list[tuple[int, torch.Tensor]] = []
        self.final_routing: RoutingPass | None = None  # the validation pass at the end (main rank)
        # torchrun: join the process group (a no-op for a single process)
        self.parallel = DataParallel.from_env(self.device, config.dist_timeout if config is not None else 600.0)
        self.device = self.parallel.device
        self.run_dir = RunDirectory(out_dir, is_main=self.parallel.is_main)
        self.run_dir.check(resume)
        self.parallel.barrier()  # every rank has looked at the run directory before rank 0 writes to it
        self.run_dir.create()  # and holds its lock until the run ends
        try:
            self._setup(config, resume)
        except BaseException:
            self.run_dir.release()
            raise

    def _setup(self, config: SoMEConfig | None, resume: bool) -> None:
        state = load_checkpoint(self.run_dir.checkpoint) if resume else None  # RNG states must stay on the CPU
        self.config = config = self._run_config(config, state)
        seed_everything(config.seed)
        self.parallel.check_batch(config.batch_size, config.grad_accum)
        with self.parallel.main_first():  # rank 0 builds (and caches) the tokenizer; the others load it
            try:
                self.data = build_data(config.data_config())
            except ValueError as e:  # the data module's check of its part of the config
                raise ConfigError(str(e)) from None
        if self.data.vocab_size > config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.data.vocab_size} tokens but vocab_size = {config.vocab_size}")
        self.steps_per_epoch = len(self.data.train) // config.batch_size  # last partial batch dropped
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.data.train)} samples, "
                              f"fewer than batch_size = {config.batch_size}")
        self.total_steps = self.steps_per_epoch * config.epochs
        # the layer whose experts the report analyses; None for a dense control (no experts)
        self.middle = config.n_layers // 2 if config.ffn == "some" else None

        with self.run_dir.logging(self.echo):  # expert construction logs what it does
            self.model, construction = build_model(config, self.device, data=self.data if state is None else None)
        if construction is not None:
            self.run_dir.write_json("dense.json", construction)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, config)
        self.checkpointer = Checkpointer(self.run_dir, config, self.model, self.optimizer,
                                         self.steps_per_epoch, self.total_steps)
        self.evaluator = EpochEvaluator(config, self.data, self.device, self.parallel, self.middle)
        if state is not None:
            # a run begun at an older methods revision goes on with the new semantics: say so, and keep
            # its revision in the checkpoints it writes from now on (it is a mixed run)
            self.model.methods_revision = state.get("methods_revision", 1)
            warn_if_methods_changed(config, self.model.methods_revision, str(self.run_dir.checkpoint))
            self.checkpointer.check(state, len(self.data.train))
            self.progress = self.checkpointer.restore(state)
            # metrics.jsonl may have lines from after the checkpoint: rewrite it from the checkpoint
            self.run_dir.write_metrics(self.progress.history)
        else:
            self.progress = Progress()
            if self.run_dir.is_main:
                config.save_yaml(self.run_dir.path / "config.yaml")
        self.ddp = self.parallel.wrap(self.model, find_unused_parameters=config.gating in ("avg_k", "top_any"))
        # compile = true: the forward (SoME ops included: they have fake kernels) through torch.compile
        self.forward = torch.compile(self.ddp if self.ddp is not None else self.model) if config.compile else None
        self.dynamics = DynamicsLog(self.run_dir, self.model, interval=config.dynamics_interval(self.total_steps),
                                    total_steps=self.total_steps, dead_after=config.dead_after,
                                    dist=self.parallel.ctx, tensorboard=config.tensorboard)
        self.dynamics.resume(self.global_step)  # records after the checkpoint are redone (none for a new run)
        total, trainable = self.model.parameter_counts()
        self.run_info = {
            "parameters": {"total": total, "trainable": trainable},
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "train_samples": len(self.data.train), "val_samples": len(self.data.val),
            "ood_samples": len(self.data.ood) if self.data.ood is not None else 0,
            "middle_layer": self.middle, "device": str(self.device),
            "torch": torch.__version__, "some": __version__, "world_size": self.parallel.world_size,
            # data preparation: tokenizing, or loading the tokens of an earlier run (some.data.token_cache)
            "data_token_seconds": self.data.token_seconds, "data_token_cache": self.data.token_cache,
            "compile": config.compile,
            "precision": resolve_precision(config.precision, self.device),  # what `auto` meant here
        }
        self.run_dir.write_json("run.json", self.run_info)

    def _run_config(self, config: SoMEConfig | None, state: dict[str, Any] | None) -> SoMEConfig:
        """The run's configuration: the given one, checked against the checkpoint's when resuming."""
        if state is not None:
            path = self.run_dir.checkpoint
            if not isinstance(state.get("config"), dict):
                raise CheckpointError(f"checkpoint {path} holds no run configuration ('config')")
            saved = SoMEConfig.from_dict(state["config"], source=str(path))
            if config is None:
                config = saved
            else:  # the run's configuration is fixed
                diff = {k: v for k, v in saved.diff(config).items() if k not in RESUMABLE_CHANGES}
                if diff:
                    what = ", ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in diff.items())
                    raise CheckpointError(f"checkpoint {path} belongs to another configuration ({what})")
        if config is None:
            raise ConfigError("a configuration is needed to start a run")
        return config.validate()

    @property
    def out(self) -> Path:
        return self.run_dir.path

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished epoch (as in ``metrics.jsonl``)."""
        return self.progress.history

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self.progress.epoch * self.steps_per_epoch + self.progress.step

    # -------------------------------------------------------------- training
    def run(self, make_plots: bool = True) -> RunResult:
        """Train to the end (or continue to it), then write the analysis, pictures and report."""
        try:
            with self.run_dir.logging(self.echo), self.parallel.peer_errors(), self._ops_backend():
                self._announce()
                while self.progress.epoch < self.config.epochs:
                    timing = self._train_epoch()
                    self._end_epoch(timing)
                if self.run_dir.is_main and self.middle is not None:  # one pass over the validation set
                    # serves the report and a study
                    with autocast(self.device, self.config.precision):
                        self.final_routing = routing_pass(self.model, self.data.val, self.config.micro_batch_size,
                                                          self.device)
                analysis = finish_run(self.run_dir, self.model, self.progress.last_usage, self.middle,
                                      make_plots=make_plots, data=self.data, config=self.config, device=self.device,
                                      rp=self.final_routing)
                if self.run_dir.is_main:  # the trained model alone, for from_pretrained / generate / eval
                    model_dir = export_model(self.model, self.out / MODEL_DIR, tokenizer=self.data.tokenizer,
                                             config=self.config, history=self.history,
                                             description=self.data.description, run_name=self.out.name)
                    log.info(f"Model: {model_dir} (SoMEForCausalLM.from_pretrained, some generate, some eval)")
        finally:
            self.dynamics.close()
            self.run_dir.release()  # the directory is free for the next run (or a resume)
        return RunResult(self.out, self.history, analysis)

    def close(self) -> None:
        """Release the run directory without running (a Trainer built only to inspect)."""
        self.dynamics.close()
        self.run_dir.release()

    def _ops_backend(self) -> contextlib.AbstractContextManager:
        """The ops backend of the run: ``ops_backend`` when it forces one, else the process's choice."""
        name = self.config.ops_backend
        return ops.use_backend(name) if name != "auto" else contextlib.nullcontext()

    def _announce(self) -> None:
        cfg = self.config
        if self.global_step == 0:
            log.info(format_parameter_counts(*self.run_info["parameters"].values()))
            what = (f"N = {cfg.num_experts}, k = {cfg.top_k}, router {cfg.router}, expert init {cfg.expert_init}"
                    if cfg.ffn == "some" else f"dense control FFN width {cfg.dense_width}")
            log.info(f"Training: {cfg.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} steps, "
                     f"batch {cfg.batch_size} x {cfg.seq_len} tokens, {what}, device {self.device}")
        else:
            log.info(f"Resuming from {self.run_dir.checkpoint} at step {self.global_step}/{self.total_steps} "
                     f"(epoch {self.progress.epoch + 1}, batch {self.progress.step})")
        backend = ops.backend_for(self.device)
        if cfg.ops_backend != "auto":
            how = f"ops_backend = {cfg.ops_backend}"
        elif ops.forced_backend() != "auto":
            how = f"forced by ${ops.ENV_VAR} or some.ops.use_backend"
        else:  # the native kernels where built (on CUDA: and verified there), else torch
            how = f"auto on {self.device.type}"
        log.info(f"Ops backend: {backend} ({how}), precision {self.run_info['precision']}")
        self.run_info["ops_backend"] = backend
        self.run_dir.write_json("run.json", self.run_info)
        if self.parallel.enabled:
            log.info(f"Data parallel: world size {self.parallel.world_size} ({self.parallel.ctx.backend}), "
                     f"{cfg.batch_size // self.parallel.world_size} samples per rank per step")

    def _train_epoch(self) -> dict[str, float]:
        """Train to the end of the current epoch; returns its timing."""
        cfg, pos = self.config, self.progress
        if pos.order is None:  # a fresh epoch (else: resuming inside one)
            pos.order = epoch_order(len(self.data.train), cfg.seed, pos.epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=pos.step, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
                   disable=None if self.progress_bar is None else not self.progress_bar, dynamic_ncols=True,
                   leave=False)
        t0, tokens0 = time.perf_counter(), pos.tokens
        while pos.step < self.steps_per_epoch:
            idx = pos.order[pos.step * cfg.batch_size:(pos.step + 1) * cfg.batch_size]
            mine = self.parallel.shard(len(idx))  # this rank's share of the global batch
            loss = self._step(collate(self.data.train, idx[mine.start:mine.stop], self.device))
            pos.step += 1
            pos.loss_sum += loss
            pos.tokens += cfg.batch_size * cfg.seq_len
            bar.update(1)
            rate = (pos.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 \
                    and pos.step < self.steps_per_epoch:  # the epoch's end saves anyway
                self._check_pending()
                self.checkpointer.save(pos)
                log.info(f"Saved checkpoint at step {self.global_step}")
            self.faults.after_step(self.global_step, self.parallel.rank, self.run_dir.checkpoint)
        bar.close()
        seconds = time.perf_counter() - t0
        return {"epoch_seconds": seconds, "train_tokens_per_s": (pos.tokens - tokens0) / max(seconds, 1e-9)}

    def _diverged(self, what: str, step: int) -> TrainingDiverged:
        # Nothing is saved: the checkpoint on disk is the last good state.
        ckpt = self.run_dir.checkpoint
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt.is_file() else "no checkpoint had been written yet"
        epoch, batch_no = divmod(step - 1, self.steps_per_epoch)
        return TrainingDiverged(f"training diverged: {what} at step {step} (epoch {epoch + 1}, batch {batch_no + 1}); "
                                f"stopped without saving; {kept}")

    def _check_pending(self) -> None:
        """Read the key-store verdicts that GPU steps left on the device (before a checkpoint)."""
        pending, self._pending_checks = self._pending_checks, []
        for step, applied in pending:
            if not bool(applied):
                raise self._diverged("a key-store update was refused (non-finite statistics, keys or update)", step)

    def _step(self, batch: dict[str, torch.Tensor]) -> float:
        step = self.global_step + 1  # 1-based number of the step being taken
        self.dynamics.before_step(step)
        try:
            result = train_step(self.model, batch, self.optimizer, self.config, step=step,
                                total_steps=self.total_steps, grad_accum=self.config.grad_accum,
                                trainable=self.trainable, ddp=self.ddp, dist=self.parallel.ctx, forward=self.forward,
                                loss_hook=self.faults.loss_hook if self.faults.nan_step else None,
                                precision=self.config.precision)
        except TrainingDiverged as e:
            raise self._diverged(str(e), step) from None
        if result.keys_applied is not None:
            self._pending_checks.append((step, result.keys_applied))
        self.dynamics.after_step(step)
        layers = self.model.some_layers()
        self.faults.write_digest(self.out, step, self.parallel.rank,
                                 (t for layer in layers for t in layer.key_store.buffers()),  # keys, μ, ...
                                 self.trainable)
        return result.loss

    def _end_epoch(self, timing: dict[str, float]) -> None:
        cfg, pos = self.config, self.progress
        metrics, usage = self.evaluator(self.model)
        record: dict[str, Any] = {"epoch": pos.epoch + 1, "step": self.global_step,
                                  "train_loss": pos.loss_sum / self.steps_per_epoch}
        record.update({k: metrics[k] for k in ("val_loss", "val_perplexity", "middle_layer", "gini", "entropy")})
        record["lr"] = lr_at(self.global_step - 1, cfg, self.total_steps)
        log.info(f"Epoch {record['epoch']}: Train Loss = {record['train_loss']:.4f}, "
                 f"Val Loss = {record['val_loss']:.4f}, Val Perplexity = {record['val_perplexity']:.2f}")
        if "ood_loss" in metrics:
            record.update(ood_loss=metrics["ood_loss"], ood_perplexity=metrics["ood_perplexity"])
            log.info(f"OOD ({cfg.ood_source}): Val Loss = {record['ood_loss']:.4f}, "
                     f"Val Perplexity = {record['ood_perplexity']:.2f}")
        if record["gini"] is not None:
            log.info(f"Middle Layer Expert Metrics: Gini = {record['gini']:.3f}, Entropy = {record['entropy']:.3f}")
        # timing is not part of the deterministic record (it differs between identical runs)
        record["timing"] = timing
        pos.history.append(record)
        pos.last_usage = usage
        pos.next_epoch()
        self._check_pending()
        self.checkpointer.save(pos)  # before metrics.jsonl: a crash in between is repaired on resume
        self.run_dir.write_metrics(pos.history)


def train(config: SoMEConfig | None, out_dir: str | Path, *, resume: bool = False,
          device: str | torch.device = "auto", make_plots: bool = True,
          progress: bool | None = None, echo: bool = True) -> RunResult:
    """Train ``config`` into ``out_dir`` (or continue the run there with
    ``resume=True``; ``config`` may then be None to take the saved one).

    Returns the per-epoch history and the final middle-layer analysis.
    """
    trainer = Trainer(config, out_dir, resume=resume, device=device, progress=progress, echo=echo)
    try:
        return trainer.run(make_plots=make_plots)
    finally:
        trainer.parallel.close()
