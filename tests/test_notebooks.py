"""notebooks/quickstart.ipynb runs top to bottom and shows what it promises:
per-epoch metrics, the utilization analysis, and two inline pictures."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _outputs(nb):
    """(text of all stream/text outputs, number of inline PNGs, errors)."""
    text, pngs, errors = [], 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                pngs += "image/png" in out.data
                text.append(out.data.get("text/markdown", "") + out.data.get("text/plain", ""))
            elif out.output_type == "error":
                errors.append(f"{out.ename}: {out.evalue}")
    return "\n".join(text), pngs, errors


def test_quickstart_notebook_executes_and_shows_metrics_and_pictures(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from some.data import CorpusUnavailableError, load_documents

    try:
        load_documents("fortunes")
    except CorpusUnavailableError as e:
        pytest.skip(f"offline corpus not installed: {e}")
    # keep the tokenizer cache of this test out of the user's cache
    monkeypatch.setenv("SOME_CACHE_DIR", str(tmp_path / "cache"))
    # ipykernel gives its sys.stderr no file descriptor when it sees PYTEST_CURRENT_TEST; the
    # editable install's on-import rebuild (`import some`) streams cmake's output to sys.stderr
    # and needs one. The kernel is not under test itself: hide the variable from it.
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    # idle OpenMP threads sleep instead of spinning: many times faster when other jobs share the CPU
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")

    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text, pngs, errors = _outputs(nb)
    assert not errors, errors
    assert "Total parameters: 701.49M" in text  # the A4 reference model, on meta
    assert re.search(r"Epoch 2: Train Loss = \d+\.\d{4}, Val Loss = \d+\.\d{4}, Val Perplexity = \d+\.\d{2}", text)
    assert re.search(r"Middle Layer Expert Metrics: Gini = \d\.\d{3}, Entropy = \d\.\d{3}", text)
    assert re.search(r"Experts used: \d+/16 \(\d+\.\d{2}%\)", text)
    assert "| epoch | train loss | val loss |" in text  # the metrics table
    assert pngs == 2  # usage histogram and key-store UMAP, inline
    assert "report.md" in text
