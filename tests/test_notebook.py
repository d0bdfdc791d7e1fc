"""launch/colab.ipynb runs top to bottom (`jupyter nbconvert --execute`): install guard, tiny model, a few Coconut
steps with the real trainer, generation and the latent top-k table."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_colab_notebook_executes(tmp_path):
    pytest.importorskip("nbconvert")
    import nbformat

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a plain runtime
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--execute", "--to", "notebook", "--output-dir",
           str(tmp_path), "--ExecutePreprocessor.timeout=600", str(REPO / "launch" / "colab.ipynb")]
    proc = subprocess.run(cmd, env=env, cwd=REPO / "launch", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    nb = nbformat.read(tmp_path / "colab.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "stage 1 loss" in text and "thought(s) | generated:" in text
    assert "| thought 1 |" in text
