"""The notebooks in colabs/: Colab-ready as stored (badge, metadata, install cell,
outputs), and executed top to bottom by a real Jupyter kernel with tiny settings
(``JAXPRUNE_SMOKE=1``), install cell included."""

import json
import os
import pathlib
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
EXPECTED = ["quickstart.ipynb", "scaling_out.ipynb", "sparse_training.ipynb",
            "structured_pruning.ipynb"]


def _repository_url() -> str:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _code(cell) -> str:
    return "".join(cell["source"])


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_colab_ready_and_stored_with_its_outputs(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    badge = (f"https://colab.research.google.com/github/{_repository_url().split('github.com/')[1]}"
             f"/blob/main/colabs/{path.name}")
    assert cells[0]["cell_type"] == "markdown" and badge in "".join(cells[0]["source"])
    assert "colab-badge.svg" in "".join(cells[0]["source"])
    assert nb["metadata"]["colab"]["name"] == path.name
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    # The install cell names the repository once, and installs only when the import fails.
    install = _code(next(c for c in cells if c["cell_type"] == "code"))
    assert re.findall(r'REPOSITORY = "([^"]+)"', install) == [_repository_url()]
    assert 'find_spec("jaxprune") is None' in install and "git+{REPOSITORY}" in install
    assert sum(_code(c).count("github.com") for c in cells if c["cell_type"] == "code") == 1
    # Stored outputs: every code cell ran, in order, without errors, and plots are inline.
    code = [c for c in cells if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert all(c["outputs"] for c in code)
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    if "plt.show()" in "".join(_code(c) for c in code):
        assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"])


@pytest.mark.slow
@pytest.mark.examples
def test_notebooks_run_top_to_bottom_in_real_kernels(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JAXPRUNE_SMOKE", "1")  # the kernels inherit this environment
    # The kernels import this checkout's jaxprune, as an installed package would be found.
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def execute(path):
        nb = nbformat.read(path, as_version=4)
        workdir = tmp_path / path.stem
        workdir.mkdir()
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}}).execute()
        return nb

    # One kernel per notebook, side by side: XLA compiles on one core per process, so
    # running them together uses every core (a failing cell raises CellExecutionError).
    with ThreadPoolExecutor(max_workers=min(len(NOTEBOOKS), os.cpu_count() or 1)) as pool:
        executed = dict(zip(NOTEBOOKS, pool.map(execute, NOTEBOOKS)))
    for path, nb in executed.items():
        printed = "".join(o.get("text", "") for o in nb.cells[1].outputs)
        # The install cell found the installed package instead of installing it again.
        assert "jaxprune" in printed and "installed jaxprune from" not in printed, path.name
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                    if o.output_type == "error"], path.name
