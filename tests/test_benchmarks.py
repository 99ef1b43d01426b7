"""``python -m benchmarks`` writes BENCHMARKS.md: every section, the header
fields, and ``--only`` replacing one section while keeping the others.
No timing is asserted (the machines are shared)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as runner  # noqa: E402

FIELDS = ("machine", "CPU count", "jax / jaxlib", "flax", "optax", "date", "git commit")


def test_only_replaces_one_section_and_keeps_the_others(tmp_path, monkeypatch):
    (tmp_path / "bench_fake.py").write_text(
        "def run(quick=False):\n    return '## Fake\\n\\nnew ' + ('quick' if quick else 'full')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(runner.SECTIONS, "fake", ("bench_fake", "Fake"))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # the runner sets it; restored after
    out = tmp_path / "B.md"
    out.write_text("<!-- section: accuracy -->\n## Accuracy\nkept 94.6\n<!-- /section: accuracy -->\n"
                   "<!-- section: fake -->\n## Fake\nold\n<!-- /section: fake -->\n")
    assert runner.main(["--only", "fake", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "kept 94.6" in text and "new quick" in text and "\nold\n" not in text
    assert text.index("## Accuracy") < text.index("## Fake")  # document order, not run order
    assert all(f"| {f} |" in text for f in FIELDS)


@pytest.mark.slow
@pytest.mark.examples
def test_quick_run_writes_every_section_header_field_and_plot(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    text = out.read_text()
    assert all(f"| {f} |" in text for f in FIELDS)
    for name in runner.SECTIONS:
        assert f"<!-- section: {name} -->" in text and f"<!-- /section: {name} -->" in text
    assert "**Failed:**" not in text
    for plot in ("accuracy_vs_sparsity.png", "structured_accuracy_vs_speedup.png", "lottery.png"):
        assert (tmp_path / runner.PLOTS / plot).stat().st_size > 0
        assert f"]({runner.PLOTS}/{plot})" in text
