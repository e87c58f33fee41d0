"""launch/colab.ipynb, executed headless with nbclient on the `test` config.

The parameters cell (tagged "parameters") gets test-sized settings appended, as papermill
injects them. The notebook then trains two steps through `python -m dense_ssl.main`, reads the
event files and must write loss_curve.png into the workdir. The correspondence cell runs too
(its failures are reported, not raised); the probes are switched off (EVALUATE = False).
"""

import json
import pathlib
import sys

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab.ipynb"
KERNEL = "dense-ssl-test-python3"


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  return cells[0]


def _kernel_manager(tmp_path):
  """A kernel running this interpreter (the venv's), whatever kernelspecs the machine has."""
  spec_dir = tmp_path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "dense_ssl tests", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_notebook_is_valid_with_default_parameters():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  namespace = {}
  exec(_parameters_cell(nb).source, namespace)  # pylint: disable=exec-used
  assert namespace["CONFIG"] == "configs/densecl.py:demo"
  assert namespace["EXTRA_FLAGS"] == [] and namespace["INSTALL"] is True
  assert namespace["EVALUATE"] is True
  assert "WORKDIR" in namespace
  # It installs the package itself from the checkout (extras, the lock as constraints).
  setup = next(c.source for c in nb.cells if c.cell_type == "code" and "if INSTALL:" in c.source)
  assert '"-c", "requirements.lock"' in setup and '"-e", f".[{' in setup
  assert "requirements.txt" not in setup
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs, "commit the notebook without outputs"
      compile(cell.source, f"cell {cell.id}", "exec")


def test_notebook_trains_and_plots(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "workdir"
  cell = _parameters_cell(nb)
  cell.source += "\n\n# Injected by tests/test_notebook.py\n" + "\n".join([
      'CONFIG = "configs/mocov2.py:test"',
      "INSTALL = False",
      f"WORKDIR = {str(workdir)!r}",
      'EXTRA_FLAGS = ["--config.total_steps=2"]',
      "EVALUATE = False",  # the default probes take over 15 minutes on a shared 2-core CPU
  ])
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=900,
                          resources={"metadata": {"path": str(ROOT / "launch")}})
  client.execute()  # raises CellExecutionError, with the cell's traceback, when a cell fails

  curve = workdir / "loss_curve.png"
  assert curve.exists() and curve.stat().st_size > 1000
  assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
  assert "dense_ssl.main" in text and "--config=configs/mocov2.py:test" in text
  assert "train/loss:" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the loss curve should be displayed inline"
