"""The parts of training that do not know about runs: the optimizer step,
evaluation, checkpoints, devices and data parallelism."""
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .device import PRECISIONS, autocast, pick_device, resolve_precision, seed_everything
from .distributed import (
    DataParallel,
    DistContext,
    all_reduce_keystore_stats,
    all_reduce_sum,
    barrier,
    init_distributed,
    shard_range,
    shutdown,
)
from .evaluate import EvalResult, evaluate
from .optim import OptimConfig, lr_at, make_optimizer
from .step import StepResult, train_step

__all__ = [
    "CHECKPOINT_FORMAT",
    "DataParallel",
    "DistContext",
    "EvalResult",
    "OptimConfig",
    "PRECISIONS",
    "StepResult",
    "all_reduce_keystore_stats",
    "all_reduce_sum",
    "autocast",
    "barrier",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "lr_at",
    "make_optimizer",
    "pick_device",
    "resolve_precision",
    "restore_rng_states",
    "rng_states",
    "save_checkpoint",
    "seed_everything",
    "shard_range",
    "shutdown",
    "train_step",
]
