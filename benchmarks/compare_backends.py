"""A whole training run on each ops backend, and how far apart their ends are.

    python benchmarks/compare_backends.py                 # preset tiny on the CPU (~3 minutes)
    python benchmarks/compare_backends.py --preset tiny-test --set epochs=2

Trains the same configuration twice, with ``ops_backend=native`` and ``ops_backend=torch``
(the same seed, data and order), and prints each run's final validation loss and their
relative difference. The two backends agree to float rounding per op, so a run's losses drift
apart only as rounding differences compound through training (near-tied top-k choices can
flip); the tests check the first 20 steps to 1e-4 (tests/test_backends.py), this checks a
whole run (it used to be a test: ~3 minutes of the CI budget). Exits 1 when the final
validation losses differ by more than ``--tolerance`` (default 2 %).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both runs")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative difference allowed (default 0.02)")
    args = parser.parse_args()
    ends = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("native", "torch"):
            out = Path(tmp) / backend
            cmd = [sys.executable, "-m", "some", "train", "--preset", args.preset, "--set", f"ops_backend={backend}",
                   f"cache_dir={Path(tmp) / 'cache'}", *args.set, "--out", str(out), "--no-plots", "--no-progress"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stderr[-2000:], file=sys.stderr)
                return 1
            ends[backend] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
            print(f"{backend:<7} final val loss {ends[backend]:.6f}")
    diff = abs(ends["torch"] - ends["native"]) / abs(ends["native"])
    print(f"relative difference {diff:.2e} (tolerance {args.tolerance:g})")
    return 0 if math.isclose(ends["torch"], ends["native"], rel_tol=args.tolerance) else 1


if __name__ == "__main__":
    sys.exit(main())
