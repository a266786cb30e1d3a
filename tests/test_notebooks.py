"""The Colab quickstart runs top to bottom (tiny size, CPU) and shows its table and plot."""

import json
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "malloc-jax-test"


def _kernel_spec(tmp_path: Path, env: dict) -> Path:
  """A kernelspec that runs this interpreter, whatever kernels the machine has installed."""
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "malloc_jax test", "language": "python", "env": env}))
  return tmp_path / "jupyter"


def _outputs(nb) -> tuple[str, list[str]]:
  text, kinds = [], []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        text.append(out["text"])
      for mime, data in out.get("data", {}).items():
        kinds.append(mime)
        if mime == "text/plain":
          text.append(data)
  return "".join(text), kinds


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  env = {"MALLOC_QUICKSTART_TINY": "1", "MALLOC_QUICKSTART_WORKDIR": str(tmp_path / "run"),
         "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
         # LLVM optimization level 0: the tiny model's programs compile 3-4x faster on CPU.
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path, env)))
  nb = nbformat.read(ROOT / "colab" / "quickstart.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text, kinds = _outputs(nb)
  for method in ("native", "lowrank", "h2o", "kivi"):
    assert f"| {method} |" in text, text[-3000:]
  assert "TINY=True" in text
  assert "image/png" in kinds
  assert (tmp_path / "run" / "pareto.png").stat().st_size > 1000
  assert not os.environ.get("MALLOC_QUICKSTART_TINY")  # the kernel's env, not ours
