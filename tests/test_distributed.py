"""Data-parallel training on the CPU with gloo: 2 processes under torchrun.

The key stores are updated outside autograd, so the ranks must all-reduce the
key-store statistics before every update; these tests check that the ranks
stay identical step by step, that 2 ranks compute what 1 process computes with
the same global batch, that a 2-rank checkpoint resumes on 1 rank, and that a
dead rank makes the other fail with a clear error instead of hanging.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")]

BASE = ["--preset", "tiny-test", "--set", "batch_size=8", "grad_accum=2", "epochs=2", "--no-plots", "--no-progress"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_train(out: Path, *extra: str, nproc: int = 1, timeout: int = 300, check: bool = True, base=BASE,
              faults: dict[str, str] | None = None):
    if nproc == 1:
        cmd = [sys.executable, "-m", "some", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "some", "train"]
    env = {**_env(), **{f"SOME_FAULT_{k.upper()}": v for k, v in (faults or {}).items()}}
    try:
        proc = subprocess.run(cmd + list(base) + list(extra) + ["--out", str(out)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # say where it stood (a hang once seen only in full-suite runs)
        tail = [(b or b"").decode(errors="replace")[-3000:] for b in (e.stdout, e.stderr)]
        raise AssertionError(f"training did not end in {timeout} s:\n{tail[0]}\n{tail[1]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a: float, b: float, rtol: float = 2e-3) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    run_train(out)
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "two"
    run_train(out, nproc=2, faults={"state_digest": "1"})
    return out


def test_ranks_identical_after_every_step(two_rank_run):
    rank0 = (two_rank_run / "digest.rank0.jsonl").read_text().splitlines()
    rank1 = (two_rank_run / "digest.rank1.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rank0]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 16  # 64 // 8 * 2 epochs
    assert rank0 == rank1  # keys, velocities, usage, parameters: bit-identical digests, step by step
    # and the digests change: the key stores really move
    assert len({json.loads(line)["keys"] for line in rank0}) == len(rank0)


def test_two_ranks_match_one_process(single_run, two_rank_run):
    one, two = metrics(single_run), metrics(two_rank_run)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss", "gini", "entropy"):
            assert close(a[key], b[key]), (key, a[key], b[key])


def test_only_rank_zero_writes(two_rank_run):
    names = {p.name for p in two_rank_run.iterdir()}
    assert {"metrics.jsonl", "checkpoint.pt", "report.md", "train.log"} <= names
    log = (two_rank_run / "train.log").read_text()
    assert log.count("Epoch 1:") == 1  # one rank logs
    assert "world size 2" in log


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, single_run):
    out = tmp_path / "resumed"
    first = run_train(out, "--set", "checkpoint_every=5", nproc=2, check=False, faults={"stop_after_step": "10"})
    assert first.returncode != 0 and "stopped after step 10" in first.stdout + first.stderr
    assert len(metrics(out)) == 1  # epoch 1 (8 steps) done, stopped inside epoch 2
    run_train(out, "--resume", "--no-plots", "--no-progress", base=())  # the run's own config
    want, got = metrics(single_run), metrics(out)
    assert len(got) == 2
    for a, b in zip(want, got):
        assert close(a["val_loss"], b["val_loss"]) and close(a["train_loss"], b["train_loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_rank_stops_the_other_with_a_clear_error(tmp_path):
    """Rank 1 dies at step 3 (no torchrun agent to clean up): rank 0 must fail
    with a clear error within the collective timeout, not hang."""
    port = _free_port()
    out = tmp_path / "dead"
    procs = []
    t0 = time.monotonic()
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), SOME_FAULT_DIE_AT_STEP="3", SOME_FAULT_DIE_RANK="1")
        cmd = [sys.executable, "-m", "some", "train", *BASE, "--set", "dist_timeout=30", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    elapsed = time.monotonic() - t0
    assert procs[1].returncode != 0
    assert procs[0].returncode not in (0, None)
    text = outs[0][0] + outs[0][1]
    assert "another rank" in text and "Traceback" not in text, text[-2000:]
    assert elapsed < 200


def test_ranks_keep_identical_routing_health_state(tmp_path):
    # center_queries: μ comes from the step's real rows of every rank (summed before the
    # update); balance_bias: the bias from the step's counts of every rank; key_init = data:
    # rank 0's k-means keys (and μ) broadcast at the first forward. So two ranks hold the
    # same μ, biases, keys and parameters after every step.
    out = tmp_path / "centered"
    run_train(out, "--set", "center_queries=true", "balance_bias=true", "key_init=data", nproc=2,
              faults={"state_digest": "1"})
    rank0 = (out / "digest.rank0.jsonl").read_text().splitlines()
    assert rank0 == (out / "digest.rank1.jsonl").read_text().splitlines() and len(rank0) == 16
