"""Runs: the experiment configuration and its presets, the model of a run,
the trainer and its run directory, and the run's report."""
from .build import build_model
from .checkpointer import Checkpointer, Progress
from .config import PRESETS, DataFields, RunFields, SoMEConfig, apply_overrides, get_preset
from .report import build_report, finish_run, read_run, utilization_analysis, write_report
from .rundir import CHECKPOINT, RunDirectory
from .trainer import EpochEvaluator, RunResult, Trainer, train

__all__ = [
    "CHECKPOINT",
    "PRESETS",
    "Checkpointer",
    "DataFields",
    "EpochEvaluator",
    "Progress",
    "RunDirectory",
    "RunFields",
    "RunResult",
    "SoMEConfig",
    "Trainer",
    "apply_overrides",
    "build_model",
    "build_report",
    "finish_run",
    "get_preset",
    "read_run",
    "train",
    "utilization_analysis",
    "write_report",
]
