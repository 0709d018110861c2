"""notebooks/quickstart.ipynb executes top to bottom (nbclient), as a Colab or local user would run it."""

import pathlib
import time

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.timeout(240)
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel inherits this environment: one CPU device as on a laptop (not the session's 8 fake devices).
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  install = nb.cells[1].source
  assert '"google.colab" in sys.modules' in install  # the install cell does nothing outside Colab
  start = time.perf_counter()
  nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  seconds = time.perf_counter() - start
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "records; weights" in outputs and "'p1@t2'" in outputs
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  print(f"notebook executed in {seconds:.1f} s")
