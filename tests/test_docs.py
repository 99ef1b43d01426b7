"""The Python snippets of docs/*.md run, in order, in one namespace per page."""

import pathlib
import re

import jax
import pytest

PAGES = sorted((pathlib.Path(__file__).parent.parent / "docs").glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_doc_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write checkpoints write here
    namespace = {"__name__": "__doc__"}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
        exec(compile(block, f"{page.name}[snippet {i}]", "exec"), namespace)


def test_readme_quickstarts_run():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace = {"__name__": "__readme__"}
    exec(compile(blocks[0], "README.md[scores -> masks -> apply]", "exec"), namespace)
    kernels = [m for m in jax.tree.leaves(namespace["masks"])]
    n = sum(m.size for m in kernels)
    assert sum(int((~m).sum()) for m in kernels) == round(0.9 * n)
    exec(compile(blocks[1], "README.md[prune while training]", "exec"), namespace)
    assert int(namespace["state"][1].count) == 1
