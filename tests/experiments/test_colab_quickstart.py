"""The Colab quickstart notebook runs top to bottom headless with the tiny model."""

import os

import pytest

from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "experiments", "colab_quickstart.ipynb")


def _outputs(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return cells


def _text(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.slow
def test_quickstart_notebook_runs_headless(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = cpu_env(drop=("MPLBACKEND",))
    env.update(NVLM_QUICKSTART_STEPS="10", NVLM_JAX_REPO=REPO, NVLM_CHECKPOINT="",
               PYTHONPATH=REPO, NVLM_JAX_CACHE_DIR="off")
    # "python3" is ipykernel's native kernel spec: the interpreter running this test (the venv's).
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    chat = _text(_outputs(nb, "chat")[0])
    lines = dict(line.split(": ", 1) for line in chat.splitlines() if ": " in line)
    assert lines["Q"] == "What colour is the shape?" and isinstance(lines["A"], str)
    for cell in _outputs(nb, "figure"):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    assert "exact match" in _text(_outputs(nb, "eval")[0])
    assert "10 steps in" in _text(_outputs(nb, "train")[0])
