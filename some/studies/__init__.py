"""Ablation studies (docs/method.md §7): study files, running their runs, and the comparison tables.

    some ablate experiments/gating.yaml                   # the full study (GPU-sized)
    some ablate experiments/gating.yaml --smoke           # its CPU smoke version, minutes
    some ablate experiments/gating.yaml --dry-run         # validate, list the runs, train nothing
"""
from .runner import measure_run, run_status, run_study
from .schema import Dataset, Measure, Run, Study, Variant, load_study
from .summary import RESULT, read_results, summarize

__all__ = [
    "RESULT",
    "Dataset",
    "Measure",
    "Run",
    "Study",
    "Variant",
    "load_study",
    "measure_run",
    "read_results",
    "run_status",
    "run_study",
    "summarize",
]
