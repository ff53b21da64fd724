"""``dynamics.jsonl`` of a run (and, optionally, TensorBoard events): the
routing dynamics of every SoME layer every ``log_every`` optimizer steps.

The trainer calls :meth:`DynamicsLog.before_step` and :meth:`after_step`
around each optimizer step; everything else happens here: which steps log,
asking the layers to probe their top-k sets on a logged step, the
data-parallel sum of the per-rank window sums, the records
(:func:`some.analysis.dynamics_records`), the file, TensorBoard, and
resetting the windows. Between two records nothing reads the device.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..analysis import DYNAMICS_FIELDS, dynamics_records
from ..engine.distributed import DistContext, all_reduce_sum
from ..errors import RunDirError
from ..files import atomic_write, read_text_file
from .rundir import DYNAMICS_FILE, TENSORBOARD_DIR, RunDirectory

__all__ = ["DYNAMICS_FILE", "DynamicsLog", "read_dynamics"]

log = logging.getLogger(__name__)


def read_dynamics(run_dir: str | Path, *, upto_step: int | None = None, repair: bool = False) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/dynamics.jsonl`` (``[]`` if there is none), up to
    ``upto_step``. A damaged line is an error, except (with ``repair``) the
    last one, which a run stopped while writing it may have left half-written."""
    path = Path(run_dir) / DYNAMICS_FILE
    if not path.is_file():
        return []
    lines = read_text_file(path, "run file").splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if repair and lineno == len(lines):
                log.warning(f"{path}:{lineno}: dropping a half-written last line")
                break
            raise RunDirError(f"{path}:{lineno}: not valid JSON ({e.msg}); the run directory is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunDirError(f"{path}:{lineno}: not a dynamics record (no integer 'step')")
        if upto_step is None or record["step"] <= upto_step:
            records.append(record)
    return records


class DynamicsLog:
    """Writes a record per SoME layer every ``interval`` optimizer steps (and at the last)."""

    def __init__(self, run_dir: RunDirectory, model, *, interval: int, total_steps: int, dead_after: int,
                 dist: DistContext, tensorboard: bool = False):
        self.run_dir, self.model, self.interval, self.total_steps = run_dir, model, interval, total_steps
        self.dead_after, self.dist = dead_after, dist
        self.path = run_dir.path / DYNAMICS_FILE
        self.writer = self._tensorboard() if tensorboard and run_dir.is_main else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunDirError("tensorboard = true needs the tensorboard package: pip install 'some[tensorboard]' "
                              "(or pip install tensorboard)") from None
        return SummaryWriter(str(self.run_dir.path / TENSORBOARD_DIR))

    def resume(self, step: int) -> None:
        """Keep the records up to ``step`` (the checkpoint's): later ones are redone."""
        if self.run_dir.is_main:
            kept = read_dynamics(self.run_dir.path, upto_step=step, repair=True)
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def logs_at(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    def before_step(self, step: int) -> None:
        """Step ``step`` (1-based) is about to run: on a logged step the layers
        measure their top-k sets once (a host synchronization, so only then)."""
        if self.logs_at(step):
            for layer in self.model.some_layers():
                layer.telemetry.probe_next = True

    def after_step(self, step: int) -> list[dict[str, Any]] | None:
        """Step ``step`` is done: on a logged step write the records and start new windows."""
        if not self.logs_at(step):
            return None
        layers = self.model.some_layers()
        # the key-update sums are already global; the forward sums are per rank
        all_reduce_sum(self.dist, [t for layer in layers for t in layer.telemetry.window_reducibles()],
                       what="all-reduce of the routing dynamics")
        records = dynamics_records(self.model, step=step, dead_after=self.dead_after)
        for layer in layers:
            layer.telemetry.reset_window()
            layer.telemetry.probe_next = False
        if self.run_dir.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
            if self.writer is not None:
                self._write_tensorboard(records, step)
        return records

    def _write_tensorboard(self, records: list[dict[str, Any]], step: int) -> None:
        import numpy as np

        for r in records:
            for name in DYNAMICS_FIELDS:
                if r.get(name) is not None:
                    self.writer.add_scalar(f"layer{r['layer']}/{name}", r[name], step)
            counts = np.asarray(r["counts"], dtype=np.float64)
            total = counts.sum()
            if total > 0:  # the selections' expert indices, one bucket per expert (no per-sample array)
                idx = np.arange(counts.size, dtype=np.float64)
                used = np.nonzero(counts)[0]
                self.writer.add_histogram_raw(
                    f"layer{r['layer']}/usage", min=float(used[0]), max=float(used[-1]), num=int(total),
                    sum=float((idx * counts).sum()), sum_squares=float((idx * idx * counts).sum()),
                    bucket_limits=(idx + 0.5).tolist(), bucket_counts=counts.tolist(), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
