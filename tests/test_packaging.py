"""A plain, non-editable install works: the wheel that ``pip install .`` builds from this
checkout, installed into a fresh virtual environment (no access to the editable install),
runs ``some info`` and a ``tiny-test`` training."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n" \
                                f"{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_trains(tmp_path):
    wheels = tmp_path / "wheels"
    # what `pip install .` does: build the wheel of the checkout against the installed torch
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(ROOT),
          "-w", str(wheels)], timeout=1200)
    (wheel,) = wheels.glob("some-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("some/__init__.py", "some/runs/__init__.py", "some/studies/__init__.py", "some/nn/layer.py"):
        assert package in names, f"the wheel lacks {package}"
    assert any(n.startswith("some/_C") for n in names), "the wheel lacks the compiled extension"

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                                   capture_output=True, text=True).stdout.strip()
    _run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}", f"{wheel}[train]"], timeout=1200)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    some = env_dir / "bin" / "some"
    info = _run([str(some), "info"], cwd=tmp_path, env=clean)
    assert "native" in info.stdout
    where = _run([str(py), "-c", "import some; print(some.__file__)"], cwd=tmp_path, env=clean).stdout
    assert str(env_dir) in where  # the installed package, not this checkout
    _run([str(some), "train", "--preset", "tiny-test", "--out", str(tmp_path / "run"), "--no-plots",
          "--set", f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, env=clean, timeout=600)
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()
