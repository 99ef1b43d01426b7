"""Every script in examples/ answers --help at once and runs with tiny settings
(``JAXPRUNE_SMOKE=1``), printing the evidence it promises.

The smoke runs execute in this process (``runpy``, as ``python examples/x.py``
would) so that the JAX import is paid once; they are marked ``slow`` and
``examples`` so that CI can schedule them on their own (``-m examples``).
"""

import pathlib
import re
import runpy
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "common.py")

# What each example must print: its baselines, speed-ups and checks.
EVIDENCE = {
    "quickstart.py": [r"method\s+test acc\s+params nonzero / total\s+checkpoint\s+sparse export"
                      r"\s+FLOPs/img\s+eff\. FLOPs/img\s+latency\s+speed-up",
                      r"\ndense\s+\d\.\d{3}", r"gradual magnitude 90%", r"structured 50% channels",
                      r"hybrid 50% ch\. \+ 80%", r"one-shot 90%\s", r"one-shot 90% \+ fine-tune",
                      r"\d+\.\d\dx"],
    "sparsity_sweep.py": [r"dense baseline", r"local\s+global\s+ERK\s+global\+LAMP"],
    "lottery_ticket.py": [r"ticket acc\s+random re-init acc", r"\n0\s+0\.000"],
    "sparse_training.py": [r"dense baseline", r"RigL\s+90%.*\s+yes\s+0\n",
                           r"SET\s+90%.*\s+yes\s+0\n", r"static\s+90%.*\s+yes\s+0\n"],
    "n_of_m.py": [r"dense \(restored checkpoint\)",
                  r"2:4 \+ STE fine-tune\s+\d\.\d+\s+0\.500\s+yes"],
    "structured_cnn.py": [r"\ndense\s", r"50% channels removed.*\d\.\d\dx"],
    "structured_transformer.py": [r"Group\(size=\d+", r"\ndense\s", r"50% heads\+MLP removed.*x\n"],
    "data_parallel.py": [r"8 device\(s\)", r"all-reduce", r"mask entries that differ: 0 of"],
    "checkpoint_resume.py": [r"bit-identical: True"],
    "checkpoint_sparse_export.py": [r"90%.*\s+yes\n", r"restored forward identical: True"],
    "structured_linen_mlp.py": [r"max \|shrunk - masked dense\| over the test set = \d",
                                r"50% units removed.*x\n"],
    "structured_group_lasso.py": [r"plain Adam", r"Adam \+ group lasso.*x\n"],
}


@pytest.fixture
def example_env(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)  # figures and outputs land here
    monkeypatch.setenv("JAXPRUNE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def _run(path, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")


def test_every_example_is_listed_with_the_evidence_it_prints():
    assert sorted(p.name for p in EXAMPLES) == sorted(EVIDENCE)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_help_exits_before_doing_any_work(path, example_env, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(path, ["--help"], monkeypatch)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--smoke" in out
    assert list(example_env.iterdir()) == []  # nothing trained, nothing written


@pytest.mark.slow
@pytest.mark.examples
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_tiny_settings_and_prints_its_evidence(path, example_env, monkeypatch,
                                                                 capsys):
    temp = pathlib.Path(tempfile.gettempdir())
    before = set(temp.glob("jaxprune_*"))
    _run(path, [], monkeypatch)
    out = capsys.readouterr().out
    for pattern in EVIDENCE[path.name]:
        assert re.search(pattern, out), f"{path.name} did not print {pattern!r}:\n{out[-3000:]}"
    for figure in re.findall(r"figure: (\S+)", out):
        assert pathlib.Path(figure).stat().st_size > 1000, figure
    leftovers = set(temp.glob("jaxprune_*")) - before
    assert not leftovers, f"{path.name} left temporary files: {leftovers}"
