"""Property-based tests of the ops (tests/properties.py, hypothesis), run in a subprocess:
a crash of the process (a read or write outside a tensor) fails this test."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow  # 4 x 300 hypothesis examples in a subprocess
def test_properties_hold_and_nothing_crashes():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "properties.py")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=HERE)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "4 passed" in proc.stdout
