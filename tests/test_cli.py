"""The ``some`` command: user errors are one clear line and a non-zero exit;
``some train`` writes a complete run directory that ``some report`` rebuilds."""
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV

from some.cli import main

REPO = Path(__file__).resolve().parents[1]
# idle OpenMP threads sleep instead of spinning: many times faster when other jobs share the CPU


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("some: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_unknown_preset_lists_the_presets(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--preset", "tiny-tset", "--out", str(tmp_path / "r"))
    line = _one_line_error(err)
    assert code == 2
    assert "unknown preset 'tiny-tset' (did you mean tiny-test" in line
    assert "A4, B1, B2, B3, tiny, small, small-B1, small-B2, small-B3, tiny-test" in line
    assert not (tmp_path / "r").exists()


def test_bad_set_key_and_value(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--preset", "tiny-test", "--set", "num_expert=4", "--out", str(tmp_path))
    assert code == 2 and "unknown config key 'num_expert'; did you mean 'num_experts'" in _one_line_error(err)
    code, _, err = run_main(capsys, "train", "--preset", "tiny-test", "--set", "epochs=many", "--out", str(tmp_path))
    assert code == 2 and "--set epochs=many: expected an integer, got 'many'" in _one_line_error(err)


def test_train_needs_a_configuration(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--out", str(tmp_path / "r"))
    assert code == 2 and "give --preset NAME" in _one_line_error(err)


def test_missing_corpus(capsys, tmp_path, cache_dir):
    missing = tmp_path / "corpus.jsonl"
    code, _, err = run_main(capsys, "train", "--preset", "tiny-test", "--set", f"data_source=files:{missing}",
                            f"cache_dir={cache_dir}", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 1 and str(missing) in _one_line_error(err)


def test_corrupt_checkpoint(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00garbage")
    code, _, err = run_main(capsys, "train", "--out", str(run), "--resume")
    line = _one_line_error(err)
    assert code == 1 and str(run / "checkpoint.pt") in line and "corrupt" in line


def test_resume_without_checkpoint_and_report_of_a_non_run(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--out", str(tmp_path / "nothing"), "--resume")
    assert code == 1 and "nothing to resume" in _one_line_error(err)
    code, _, err = run_main(capsys, "report", str(tmp_path))
    assert code == 1 and "is not a run directory" in _one_line_error(err)


def test_info(capsys):
    code, out, _ = run_main(capsys, "info")
    assert code == 0
    assert "version" in out and "torch_version" in out and "tiny-test" in out


@pytest.mark.slow
def test_train_end_to_end_then_report_rebuilds(tmp_path, cache_dir):
    """`some train` as users run it (a subprocess), with the pictures, then `some report`."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs" / "e2e"
    cmd = [sys.executable, "-m", "some", "train", "--preset", "tiny-test", "--set", f"cache_dir={cache_dir}",
           "--out", str(out)]
    result = subprocess.run(cmd, check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 2: Train Loss = " in result.stdout
    for name in ("config.yaml", "run.json", "metrics.jsonl", "checkpoint.pt", "analysis.json", "train.log",
                 "report.md", "usage_histogram.png", "keystore_umap.png"):
        assert (out / name).is_file(), name
    for png in ("usage_histogram.png", "keystore_umap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for expected in ("Total parameters: ", "Trainable parameters: ", "Steps: 16 (2 epochs x 8 steps",
                     "Expert init: default; router: mlp", "| 1 | 8 |", "| 2 | 16 |", "Experts used: ",
                     "Final Gini: ", "(Max: log2 8 = 3.000)", "![Expert usage counts (log scale)](usage_histogram.png)",
                     "![UMAP projection of the key store](keystore_umap.png)", "data_source: synthetic"):
        assert expected in report, expected

    (out / "report.md").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "some", "report", str(out)], check=False, cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "report.md").read_text() == report


def test_python_dash_m_some_train_takes_the_train_arguments():
    result = subprocess.run([sys.executable, "-m", "some", "train", "--help"], check=False, cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--preset", "--set", "--out", "--resume", "--device"):
        assert option in result.stdout
