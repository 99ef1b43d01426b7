"""The Python snippets of docs/*.md run, in order, in one namespace per page."""

import pathlib
import re

import pytest

PAGES = sorted((pathlib.Path(__file__).parent.parent / "docs").glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_doc_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write checkpoints write here
    namespace = {"__name__": "__doc__"}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
        exec(compile(block, f"{page.name}[snippet {i}]", "exec"), namespace)
