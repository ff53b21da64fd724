"""Train a SoME language model and write its run directory (SPEC §6).

    python -m some.train --preset tiny --out runs/tiny          # same as `some train ...`
    python -m some.train --preset tiny --out runs/tiny --resume  # continue after a crash

The loop is the usual one (AdamW on the trainable parameters, linear warmup +
cosine decay, gradient accumulation, clipping, bf16 autocast on CUDA) plus one
SoME-specific line: ``model.update_keys()`` after every optimizer step, which
self-organizes the key stores from the routing statistics of that step.

Run directory (``--out``)::

    config.yaml       the full configuration
    run.json          parameter counts, steps, device, versions
    train.log         everything printed
    metrics.jsonl     one line per epoch
    checkpoint.pt     latest good state (atomic writes), for --resume
    analysis.json     middle-layer utilization at the end
    usage_histogram.png, keystore_umap.png, report.md

On a CPU shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: spinning
OpenMP threads made `tiny` 10x slower on 2 busy cores (same results).

Resuming is exact: the checkpoint holds the model (with key stores), the
optimizer, every RNG state and the data position, so a resumed CPU run is
bit-identical to an uninterrupted one.

Data parallel: under ``torchrun --nproc_per_node=P -m some.train ...`` each
rank takes a 1/P share of every global batch (DistributedDataParallel, NCCL on
GPU, gloo on CPU); before each key-store update the ranks all-reduce the
key-store statistics, so every rank applies the same update and the stores
stay identical. Metrics are reduced over the ranks; rank 0 alone writes the
run directory; a checkpoint resumes with any number of ranks (the data
position is counted in global steps).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .config import ConfigError, SoMEConfig
from .data import build_data
from .distributed import (
    DistContext,
    PeerLostError,
    all_reduce_keystore_stats,
    all_reduce_sum,
    barrier,
    init_distributed,
    shard_range,
    shutdown,
)
from .metrics import entropy_bits, experts_used, gini, max_entropy_bits
from .model import SoMEForCausalLM, format_parameter_counts, lm_loss

__all__ = [
    "CheckpointError",
    "EvalResult",
    "RunDirError",
    "RunResult",
    "RunStopped",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "train",
]

CHECKPOINT_FORMAT = "some-checkpoint-v1"
CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/Inf; the run stopped."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (exists / nothing to resume)."""


class RunStopped(RuntimeError):
    """The run stopped on request (debug_stop_after_step) after saving its checkpoint."""


# Fields that may differ between a run and its resumption: they change how the
# run is executed, not what it computes.
RESUMABLE_CHANGES = ("dist_timeout",)


# ------------------------------------------------------------------ schedule


def lr_at(step: int, config: SoMEConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to
    ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``min_learning_rate`` at ``total_steps``. A pure function of the step, so
    the schedule needs no state of its own in the checkpoint."""
    peak, floor = config.learning_rate, config.min_learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model: SoMEForCausalLM, config: SoMEConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen experts are left out);
    weight decay on matrices and embeddings, none on biases and norms."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2))


# ---------------------------------------------------------------------- data


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of an epoch: a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


def collate(dataset, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the items ``dataset[i]`` (dicts of ``(S,)`` tensors) into a batch of ``(B, S)``."""
    items = [dataset[int(i)] for i in indices]
    batch = {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "labels", "attention_mask")}
    batch["attention_mask"] = batch["attention_mask"].bool()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Real next-token targets of a batch (what the loss averages over)."""
    return int(((batch["labels"] != -100) & batch["attention_mask"]).sum())


def _autocast(device: torch.device):
    # bf16 on CUDA (the reference runs); plain fp32 on the CPU, where bf16 is slow
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    loss: float  # mean next-token loss over real tokens
    perplexity: float  # exp(loss)
    tokens: int  # real targets counted
    usage_counts: torch.Tensor | None = None  # (N,) int64, selections in the tracked layer


@torch.no_grad()
def evaluate(model: SoMEForCausalLM, dataset, batch_size: int, device: torch.device,
             track_layer: int | None = None, dist_ctx: DistContext = DistContext()) -> EvalResult:
    """Token-weighted validation loss over the whole ``dataset``, and the usage
    counts of SoME layer ``track_layer`` over its real tokens. With several
    ranks each evaluates its share and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    layer = model.some_layers()[track_layer] if track_layer is not None else None
    if layer is not None:
        layer.reset_usage()
        layer.track_usage = True
    loss_sum, tokens = 0.0, 0
    share = shard_range(len(dataset), dist_ctx)
    try:
        for start in range(share.start, share.stop, batch_size):
            batch = collate(dataset, range(start, min(start + batch_size, share.stop)), device)
            with _autocast(device):
                logits = model(batch["input_ids"], batch["attention_mask"]).logits  # (B, S, V)
            loss_sum += float(lm_loss(logits, batch["labels"], batch["attention_mask"], reduction="sum"))
            tokens += count_targets(batch)
    finally:
        if layer is not None:
            layer.track_usage = False
        model.train(was_training)
    if dist_ctx.enabled:
        sums = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device)
        all_reduce_sum(dist_ctx, [sums] + ([layer.usage_counts] if layer is not None else []),
                       what="all-reduce of the validation metrics")
        loss_sum, tokens = float(sums[0]), int(sums[1])
    loss = loss_sum / max(tokens, 1)
    counts = layer.usage_counts.detach().cpu().clone() if layer is not None else None
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens, counts)


# ---------------------------------------------------------------- checkpoints


def _rng_states(model: SoMEForCausalLM) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state as tensors and numbers: torch.load(weights_only=True) takes no ndarrays
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        # the 'random' router re-draws its weights from a per-layer generator
        "routers": [layer.router_rng_state() for layer in model.some_layers()],
    }


def _set_rng_states(model: SoMEForCausalLM, states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    for layer, state in zip(model.some_layers(), states["routers"]):
        layer.set_router_rng_state(state)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a crash leaves either the old or the new file,
    never a torn one (temp file in the same directory, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain
    containers only: ``weights_only=True``); a clear error names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torn/corrupt/foreign files fail in many ways
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a SoME checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state


# ------------------------------------------------------------------- logging


class RunLog:
    """Print to stdout (above the progress bar) and append to ``train.log``."""

    def __init__(self, path: Path | None, echo: bool = True):
        self.path, self.echo = path, echo

    def __call__(self, message: str = "") -> None:
        if self.echo:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(message + "\n")


# ------------------------------------------------------------------- trainer


@dataclass
class RunResult:
    out_dir: Path
    history: list[dict[str, Any]]  # one record per epoch (metrics.jsonl)
    analysis: dict[str, Any] | None  # middle-layer utilization at the end


@dataclass
class _Position:
    """Where the run is: the next step to take is ``(epoch, step)``, 0-based."""

    epoch: int = 0
    step: int = 0  # within the epoch
    order: torch.Tensor | None = None  # the epoch's sample order (None before it starts)
    loss_sum: float = 0.0  # sum of this epoch's step losses so far
    tokens: int = 0  # input positions processed this epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)
    last_usage: torch.Tensor | None = None  # middle-layer val counts of the last epoch


class Trainer:
    """One training run in ``out_dir``. Use :func:`train` unless you need the parts."""

    def __init__(self, config: SoMEConfig, out_dir: str | Path, *, resume: bool = False,
                 device: str | torch.device = "auto", progress: bool | None = None, echo: bool = True):
        self.out = Path(out_dir)
        self.device = pick_device(device)
        self.progress = progress
        # torchrun: join the process group (a no-op for a single process)
        self.dist = init_distributed(self.device, config.dist_timeout if config is not None else 600.0)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        checkpoint_path = self.out / CHECKPOINT
        if resume:
            if not checkpoint_path.is_file():
                raise RunDirError(f"nothing to resume: no {CHECKPOINT} in {self.out}")
        elif self.out.exists() and any(self.out.iterdir()):
            raise RunDirError(f"run directory {self.out} is not empty; pass --resume to continue "
                              f"the run there, or choose another --out (or delete it to start over)")
        barrier(self.dist)  # every rank has looked at the run directory before rank 0 writes to it
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        # rank 0 alone logs and writes the run directory
        self.log = RunLog(self.out / "train.log" if self.is_main else None, echo=echo and self.is_main)

        state = None
        if resume:
            # to the CPU first: RNG states must stay CPU tensors; the loads below move the rest
            state = load_checkpoint(checkpoint_path, map_location="cpu")
            saved = SoMEConfig.from_dict(state["config"], source=str(checkpoint_path))
            if config is None:
                config = saved
            else:  # the run's configuration is fixed; only the debugging hooks may change
                diff = {k: v for k, v in saved.diff(config).items()
                        if not k.startswith("debug_") and k not in RESUMABLE_CHANGES}
                if diff:
                    what = ", ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in diff.items())
                    raise CheckpointError(f"checkpoint {checkpoint_path} belongs to another configuration ({what})")
        if config is None:
            raise ConfigError("a configuration is needed to start a run")
        self.config = config.validate()
        seed_everything(config.seed)

        if self.dist.enabled and config.batch_size % (self.dist.world_size * config.grad_accum):
            raise ConfigError(f"batch_size = {config.batch_size} must be divisible by world size x grad_accum = "
                              f"{self.dist.world_size} x {config.grad_accum}")
        # rank 0 builds (and caches) the tokenizer first; the others then load it from the cache
        if not self.is_main:
            barrier(self.dist)
        try:
            self.data = build_data(config.data_config())
        except ValueError as e:  # the data module's check of its part of the config
            raise ConfigError(str(e)) from None
        finally:
            if self.is_main:
                barrier(self.dist)
        if self.data.vocab_size > config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.data.vocab_size} tokens but vocab_size = {config.vocab_size}")
        self.steps_per_epoch = len(self.data.train) // config.batch_size  # last partial batch dropped
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.data.train)} samples, "
                              f"fewer than batch_size = {config.batch_size}")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.middle = config.n_layers // 2

        self.model = SoMEForCausalLM(config, device=self.device)
        if state is None and config.expert_init == "cluster":
            # experts cut from a dense FFN (SPEC §7); a resumed run has them in its checkpoint
            from .dense import init_experts_from_dense

            record = init_experts_from_dense(self.model, config, self.data, self.device, log=self.log)
            if self.is_main:
                (self.out / "dense.json").write_text(json.dumps(record, indent=2) + "\n")
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, config)
        self.pos = _Position()
        if state is not None:
            self._restore(state, checkpoint_path)
        elif self.is_main:
            config.save_yaml(self.out / "config.yaml")
        # DDP: gradients all-reduced in backward; it also broadcasts rank 0's
        # parameters and buffers once here. Buffers are not re-broadcast each
        # step: the key stores stay identical through the reduced statistics.
        self.ddp = None
        if self.dist.enabled:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                # avg_k gates do not depend on the scores, and top_any thresholds
                # can miss a step: their parameters may get no gradient
                find_unused_parameters=config.gating in ("avg_k", "top_any"))
        total, trainable = self.model.parameter_counts()
        self.run_info = {
            "parameters": {"total": total, "trainable": trainable},
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "train_samples": len(self.data.train), "val_samples": len(self.data.val),
            "ood_samples": len(self.data.ood) if self.data.ood is not None else 0,
            "middle_layer": self.middle, "device": str(self.device),
            "torch": torch.__version__, "some": _some_version(), "world_size": self.dist.world_size,
        }
        if self.is_main:
            (self.out / "run.json").write_text(json.dumps(self.run_info, indent=2) + "\n")

    # ----------------------------------------------------------- checkpoint
    def _state(self) -> dict[str, Any]:
        p = self.pos
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # the LR schedule is lr_at(step): its whole state is the step
            "scheduler": {"global_step": self.global_step, "total_steps": self.total_steps},
            "rng": _rng_states(self.model),
            "position": {"epoch": p.epoch, "step": p.step, "order": p.order, "loss_sum": p.loss_sum,
                         "tokens": p.tokens},
            "history": p.history,
            "last_usage": p.last_usage,
        }

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            _set_rng_states(self.model, state["rng"])
            pos = state["position"]
            self.pos = _Position(epoch=pos["epoch"], step=pos["step"], order=pos["order"],
                                 loss_sum=pos["loss_sum"], tokens=pos["tokens"], history=list(state["history"]),
                                 last_usage=state["last_usage"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines())  # load_state_dict's list, one line
            if len(detail) > 500:
                detail = detail[:500] + " ..."
            raise CheckpointError(f"checkpoint {path} does not match this run: {type(e).__name__}: {detail}") from None
        if state["scheduler"]["total_steps"] != self.total_steps:
            raise CheckpointError(f"checkpoint {path} was written for {state['scheduler']['total_steps']} steps, "
                                  f"this run has {self.total_steps} (did the data change?)")
        # metrics.jsonl may have lines from after the checkpoint: rewrite it from the checkpoint
        self._write_metrics()

    def save(self) -> None:
        if self.is_main:
            save_checkpoint(self.out / CHECKPOINT, self._state())

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self.pos.epoch * self.steps_per_epoch + self.pos.step

    # -------------------------------------------------------------- training
    def run(self, make_plots: bool = True) -> RunResult:
        cfg = self.config
        total, trainable = self.run_info["parameters"].values()
        if self.global_step == 0:
            self.log(format_parameter_counts(total, trainable))
            self.log(f"Training: {cfg.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} steps, "
                     f"batch {cfg.batch_size} x {cfg.seq_len} tokens, N = {cfg.num_experts}, k = {cfg.top_k}, "
                     f"router {cfg.router}, expert init {cfg.expert_init}, device {self.device}")
        else:
            self.log(f"Resuming from {self.out / CHECKPOINT} at step {self.global_step}/{self.total_steps} "
                     f"(epoch {self.pos.epoch + 1}, batch {self.pos.step})")
        if self.dist.enabled:
            self.log(f"Data parallel: world size {self.dist.world_size} ({self.dist.backend}), "
                     f"{cfg.batch_size // self.dist.world_size} samples per rank per step")
        try:
            while self.pos.epoch < cfg.epochs:
                timing = self._train_epoch()
                self._end_epoch(timing)
            analysis = self.finish(make_plots=make_plots)
        except (RuntimeError, dist.DistError) as e:
            if not self.dist.enabled or isinstance(e, (TrainingDiverged, RunStopped, PeerLostError, CheckpointError)):
                raise
            # DDP's gradient all-reduce fails inside backward when a peer is gone
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PeerLostError(f"rank {self.dist.rank}/{self.dist.world_size}: a collective failed; another rank "
                                f"probably died or stopped responding (timeout {self.dist.timeout_s:g} s): {first}") from None
        return RunResult(self.out, self.pos.history, analysis)

    def _train_epoch(self) -> dict[str, float]:
        """Train to the end of the current epoch; returns its timing."""
        cfg, pos = self.config, self.pos
        if pos.order is None:  # a fresh epoch (else: resuming inside one)
            pos.order = epoch_order(len(self.data.train), cfg.seed, pos.epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=pos.step, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
                   disable=self._bar_disabled(), dynamic_ncols=True, leave=False)
        t0, tokens0 = time.perf_counter(), pos.tokens
        while pos.step < self.steps_per_epoch:
            idx = pos.order[pos.step * cfg.batch_size:(pos.step + 1) * cfg.batch_size]
            mine = shard_range(len(idx), self.dist)  # this rank's share of the global batch
            loss = self._train_step(collate(self.data.train, idx[mine.start:mine.stop], self.device))
            pos.step += 1
            pos.loss_sum += loss
            pos.tokens += cfg.batch_size * cfg.seq_len
            rate = (pos.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 \
                    and pos.step < self.steps_per_epoch:  # the epoch's end saves anyway
                self.save()
                self.log(f"Saved checkpoint at step {self.global_step}")
            self._debug_hooks_after_step()
        bar.close()
        seconds = time.perf_counter() - t0
        return {"epoch_seconds": seconds, "train_tokens_per_s": (pos.tokens - tokens0) / max(seconds, 1e-9)}

    def _train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step over ``batch`` (this rank's share of the global
        batch, split into ``grad_accum`` micro-batches); returns the step's mean
        loss over the real targets of the whole global batch."""
        cfg, model = self.config, self.model
        forward = self.ddp if self.ddp is not None else model
        step = self.global_step + 1  # 1-based number of the step being taken
        # the loss is a mean over the global batch's targets: count them over all ranks
        n_targets = torch.tensor(float(count_targets(batch)), dtype=torch.float64, device=self.device)
        all_reduce_sum(self.dist, [n_targets], what="all-reduce of the target count")
        n_targets = max(float(n_targets), 1.0)
        micro = len(batch["input_ids"]) // cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(cfg.grad_accum):
            mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            # DDP all-reduces the gradients in the last micro-batch's backward only
            sync = self.ddp is None or i == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with _autocast(self.device):
                    logits = forward(mb["input_ids"], mb["attention_mask"]).logits
                # summed over the micro-batch's real targets (an all-padding one adds 0)
                loss = lm_loss(logits, mb["labels"], mb["attention_mask"], reduction="sum")
                if step == cfg.debug_nan_step:
                    loss = loss * float("nan")  # test hook: simulate a diverging step
                # / global targets: the step's mean; x world size: DDP averages over ranks
                (loss * (self.dist.world_size / n_targets)).backward()
            loss_sum += loss.detach().double()
        all_reduce_sum(self.dist, [loss_sum], what="all-reduce of the training loss")
        value = float(loss_sum) / n_targets
        if not math.isfinite(value):
            self._diverged(f"loss is {value}", step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self._diverged(f"gradient norm is {float(grad_norm)}", step)
        lr = lr_at(step - 1, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        # SPEC §4: self-organize the key stores after every optimizer step, from
        # the statistics of all tokens of the step (all micro-batches, all ranks)
        all_reduce_keystore_stats(self.dist, model.some_layers())
        model.update_keys()
        if cfg.debug_state_digest:
            self._write_digest(step)
        return value

    def _write_digest(self, step: int) -> None:
        """Test hook: digests of the key stores and trainable parameters after a step, per rank."""
        def digest(tensors) -> str:
            h = hashlib.sha256()
            for t in tensors:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()[:16]

        layers = self.model.some_layers()
        record = {"step": step,
                  "keys": digest(t for layer in layers for t in (layer.keys, layer.key_velocity, layer.key_usage)),
                  "params": digest(self.trainable)}
        with open(self.out / f"digest.rank{self.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _debug_hooks_after_step(self) -> None:
        cfg, step = self.config, self.global_step
        if cfg.debug_die_at_step and step == cfg.debug_die_at_step and self.dist.rank == cfg.debug_die_rank:
            os._exit(3)  # test hook: a rank that dies without a word
        if cfg.debug_stop_after_step and step == cfg.debug_stop_after_step:
            raise RunStopped(f"stopped after step {step} (debug_stop_after_step); "
                             f"continue with --resume from {self.out / CHECKPOINT}")

    def _diverged(self, what: str, step: int) -> None:
        # Nothing is saved: the checkpoint on disk is the last good state.
        ckpt = self.out / CHECKPOINT
        kept = (f"the last good checkpoint {ckpt} is kept" if ckpt.is_file()
                else "no checkpoint had been written yet")
        epoch, batch = divmod(step - 1, self.steps_per_epoch)
        raise TrainingDiverged(f"training diverged: {what} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
                               f"stopped without saving; {kept}")

    def _end_epoch(self, timing: dict[str, float]) -> None:
        cfg, pos = self.config, self.pos
        val = evaluate(self.model, self.data.val, cfg.batch_size // cfg.grad_accum, self.device, self.middle,
                       dist_ctx=self.dist)
        record: dict[str, Any] = {
            "epoch": pos.epoch + 1,
            "step": self.global_step,
            "train_loss": pos.loss_sum / self.steps_per_epoch,
            "val_loss": val.loss,
            "val_perplexity": val.perplexity,
            "middle_layer": self.middle,
            "gini": float(gini(val.usage_counts)),
            "entropy": float(entropy_bits(val.usage_counts)),
            "lr": lr_at(self.global_step - 1, cfg, self.total_steps),
        }
        self.log(f"Epoch {record['epoch']}: Train Loss = {record['train_loss']:.4f}, "
                 f"Val Loss = {val.loss:.4f}, Val Perplexity = {val.perplexity:.2f}")
        if self.data.ood is not None:
            ood = evaluate(self.model, self.data.ood, cfg.batch_size // cfg.grad_accum, self.device,
                           dist_ctx=self.dist)
            record.update(ood_loss=ood.loss, ood_perplexity=ood.perplexity)
            self.log(f"OOD ({cfg.ood_source}): Val Loss = {ood.loss:.4f}, Val Perplexity = {ood.perplexity:.2f}")
        self.log(f"Middle Layer Expert Metrics: Gini = {record['gini']:.3f}, Entropy = {record['entropy']:.3f}")
        # timing is not part of the deterministic record (it differs between identical runs)
        record["timing"] = timing
        pos.history.append(record)
        pos.last_usage = val.usage_counts
        pos.epoch, pos.step, pos.order, pos.loss_sum, pos.tokens = pos.epoch + 1, 0, None, 0.0, 0
        self.save()  # before metrics.jsonl: a crash in between is repaired on resume
        self._write_metrics()

    def _write_metrics(self) -> None:
        if not self.is_main:
            return
        tmp = self.out / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.pos.history))
        os.replace(tmp, self.out / "metrics.jsonl")

    def _bar_disabled(self) -> bool | None:
        return None if self.progress is None else not self.progress  # None: only on a terminal

    # ---------------------------------------------------------------- finish
    def finish(self, make_plots: bool = True) -> dict[str, Any]:
        """The aggregate utilization analysis of the middle layer, its pictures and report.md."""
        cfg = self.config
        counts = self.pos.last_usage
        layer = self.model.some_layers()[self.middle]
        n = cfg.num_experts
        used = experts_used(counts)
        analysis = {
            "middle_layer": self.middle,
            "num_experts": n,
            "experts_used": used.used,
            "experts_used_text": str(used),  # '64/64 (100.00%)' 
            "gini": float(gini(counts)),
            "entropy": float(entropy_bits(counts)),
            "max_entropy": float(max_entropy_bits(n)),
            "usage_counts": counts.tolist(),
        }
        self.log(f"Aggregate utilization analysis (middle layer {self.middle} of {cfg.n_layers}, validation set):")
        self.log(f"Experts used: {analysis['experts_used_text']}")
        self.log(f"Final Gini: {analysis['gini']:.3f}")
        self.log(f"Final Entropy: {analysis['entropy']:.3f} (Max: {analysis['max_entropy']:.3f})")
        if not self.is_main:  # rank 0 writes the analysis, pictures and report
            return analysis
        (self.out / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
        if make_plots:
            from .plots import keystore_umap, usage_histogram

            usage_histogram(counts, self.out / "usage_histogram.png",
                            title=f"Expert usage, layer {self.middle} (N = {n}, validation set)", unit="selections")
            keystore_umap(layer.keys.detach().float().cpu(), counts, self.out / "keystore_umap.png",
                          title=f"Key store (UMAP), layer {self.middle}, colored by usage")
        from .report import write_report

        path = write_report(self.out)
        self.log(f"Report: {path}")
        return analysis


# ------------------------------------------------------------------- helpers


def pick_device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (torch, CUDA, python, numpy) for the run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _some_version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


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
        shutdown(trainer.dist)


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
