"""scripts/gpu_check.sh cannot look green when it failed: its CPU dry run
(SOME_GPU_CHECK_DRY=1: every step at tiny sizes, no build) with steps forced to
fail (SOME_GPU_CHECK_FAIL), the deadline, and the rerun of what failed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["gpu", "build", "import", "selftest", "ops_tests", "gemm_kernels", "memcheck", "initcheck", "bench_a4",
         "train_a4", "model_tests"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                                   reason="needs bash and timeout")]


def run_check(base: Path, *args: str, **env: str) -> tuple[int, str, dict[str, str]]:
    """Run the dry check with its output, state and work folders under ``base``; the exit
    status, summary.txt and {step: status} read from the summary's step lines."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SOME_GPU_CHECK_", "GPU_CHECK_"))}
    full_env = {**clean, "SOME_GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "OMP_WAIT_POLICY": "PASSIVE", "OUT": str(base / "out"), "GPU_CHECK_STATE_DIR": str(base / "state"),
                "GPU_CHECK_WORK": str(base / "work"), **env}
    out = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                         timeout=900)
    summary = (base / "out" / "summary.txt").read_text() if (base / "out" / "summary.txt").is_file() else ""
    statuses = {}
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in STEPS:
            statuses[parts[1]] = parts[0]
    return out.returncode, summary + "\n--- stdout\n" + out.stdout + "\n--- stderr\n" + out.stderr, statuses


def archived(base: Path) -> set[str]:
    with tarfile.open(base / "out" / "gpu_check_logs.tar.gz") as tar:
        return {Path(n).name for n in tar.getnames()}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check_full")
    return base, *run_check(base)


def test_the_full_dry_run_passes_every_step_and_writes_summary_and_archive(full):
    base, rc, text, statuses = full
    assert rc == 0, text
    assert text.startswith("RESULT: OK"), text
    assert statuses == {s: "SKIP" if s == "initcheck" else "PASS" for s in STEPS}, text
    assert sorted(p.name for p in (base / "out").iterdir()) == ["gpu_check_logs.tar.gz", "summary.txt"]
    names = archived(base)
    assert {f"{s}.log" for s in STEPS} <= names
    assert {"ops_tests.xml", "gemm_kernels.xml", "model_tests.xml", "bench_a4.json", "metrics.jsonl"} <= names
    # the training run stays outside $OUT, only its summary line comes back
    assert (base / "work" / "run_a4" / "metrics.jsonl").is_file()
    assert "steps" in text and "tokens/s" in text


def test_a_failed_build_stops_before_the_later_steps(tmp_path):
    rc, text, statuses = run_check(tmp_path, SOME_GPU_CHECK_FAIL="build")
    assert rc != 0, text
    assert text.startswith("RESULT: FAILED: build"), text
    assert statuses["gpu"] == "PASS" and statuses["build"] == "FAIL", text
    assert all(statuses[s] == "NOTRUN" for s in STEPS[2:]), text
    assert "not run: the build step failed" in text
    names = archived(tmp_path)
    assert "build.log" in names and "import.log" not in names and "selftest.log" not in names


def test_a_failed_later_step_fails_the_check_and_the_next_steps_still_run_then_rerun(tmp_path, full):
    base = full[0]
    shutil.copytree(base / "state", tmp_path / "state")  # the full run's state: everything passed
    # selftest forced to fail; of the steps after it, memcheck and initcheck (GPU_CHECK_ONLY keeps this short:
    # the full run above checks every step's command)
    rc, text, statuses = run_check(tmp_path, SOME_GPU_CHECK_FAIL="selftest",
                                   GPU_CHECK_ONLY="selftest,memcheck,initcheck")
    assert rc != 0, text
    assert text.startswith("RESULT: FAILED: selftest"), text
    assert {s: v for s, v in statuses.items() if v != "kept"} == {
        "gpu": "PASS", "import": "PASS", "selftest": "FAIL", "memcheck": "PASS", "initcheck": "SKIP"}, text
    assert "forced failure" in text and "dry run: no compute-sanitizer" in text
    # rerun: only what did not pass (and the gpu and import checks); the rest is kept from earlier calls
    rc, text, statuses = run_check(tmp_path, "rerun")
    assert rc == 0, text
    assert text.startswith("RESULT: OK"), text
    assert statuses == {**{s: "kept" for s in STEPS}, "gpu": "PASS", "import": "PASS", "selftest": "PASS"}, text
    assert {n for n in archived(tmp_path) if n.endswith(".log")} == {"gpu.log", "import.log", "selftest.log"}
    state = (tmp_path / "state" / "state.tsv").read_text()
    assert state.startswith("sources\t")  # the fingerprint of the sources the outcomes are for
    assert all(line.split("\t")[1] in ("PASS", "SKIP") for line in state.splitlines()[1:]), state


def test_a_step_that_cannot_start_before_the_deadline_fails_the_check(tmp_path):
    rc, text, statuses = run_check(tmp_path, GPU_CHECK_DEADLINE_S="12")
    assert rc != 0, text
    assert statuses["gpu"] == "TIMEOUT" and "not started: the 12s deadline" in text, text
    assert all(statuses[s] == "NOTRUN" for s in STEPS[1:]), text


def test_unknown_step_names_are_refused(tmp_path):
    rc, text, _ = run_check(tmp_path, GPU_CHECK_ONLY="bench")
    assert rc == 2 and "unknown step 'bench'" in text


def test_a_rerun_with_the_state_of_other_sources_runs_everything(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.tsv").write_text("sources\t0000000000000000\n" + "".join(
        f"{s}\t{'FAIL' if s == 'bench_a4' else 'PASS'}\t0\n" for s in STEPS))
    # the deadline lets nothing start: this checks the choice of steps only
    rc, text, statuses = run_check(tmp_path, "rerun", GPU_CHECK_DEADLINE_S="12")
    assert rc != 0, text
    assert "the state file is of other sources: its outcomes are void: everything runs" in text, text
    assert statuses == {"gpu": "TIMEOUT", **{s: "NOTRUN" for s in STEPS[1:]}}, text
