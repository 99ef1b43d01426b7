"""Every script in examples/ answers --help at once and runs with tiny settings
(``JAXPRUNE_SMOKE=1``), printing the evidence it promises.

Most of a smoke run's time is XLA compiling on one core, and the rest is
importing JAX, Flax and orbax and parsing MNIST. So the runs are shared out
among one worker process per core; each worker imports once and runs its
examples one after another as ``python examples/x.py`` would (``runpy`` with
``__name__ == "__main__"``, its own working and temporary directory). The
workers start when the first smoke test needs them; each test checks its own
example's output. The smoke tests are marked ``slow`` and ``examples`` so that
CI can schedule them on their own (``-m examples``).
"""

import os
import pathlib
import re
import runpy
import subprocess
import sys

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
    "oneshot_lm.py": [r"dense perplexity \d", r"\| sparsity \| dense \| magnitude \(per layer\) \| wanda \(per row\) \| sparsegpt \|",
                      r"\| 2:4 \| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\d{3} \|"],
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


SMOKE_TEST = "test_example_runs_with_tiny_settings_and_prints_its_evidence"
# Rough CPU seconds of each smoke run, to share the runs out evenly between workers.
COST = {"quickstart.py": 30, "checkpoint_resume.py": 20, "structured_cnn.py": 17,
        "structured_transformer.py": 14, "data_parallel.py": 12, "sparse_training.py": 12}


def run_in_this_process(paths: list, out_dir: pathlib.Path) -> None:
    """Worker: runs each example as ``__main__``; writes its stdout, stderr, exit
    status and leftover temporary files to ``out_dir/<name>.json``."""
    import contextlib
    import io
    import json
    import tempfile
    import traceback

    sys.path.insert(0, str(ROOT / "examples"))
    for path in map(pathlib.Path, paths):
        work = out_dir / path.stem
        temp = work / "tmp"  # the run's own temporary directory: what it leaves there is seen
        temp.mkdir(parents=True)
        os.chdir(work)
        os.environ["TMPDIR"] = tempfile.tempdir = str(temp)
        sys.argv = [str(path)]
        out, err, status = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported to the test
                status = 1
                traceback.print_exc()
        (out_dir / f"{path.name}.json").write_text(json.dumps({
            "status": status, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "work": str(work), "leftovers": sorted(map(str, temp.iterdir()))}))


@pytest.fixture(scope="session")
def smoke_runs(request, tmp_path_factory):
    """Starts one worker per core over the selected examples; returns a function
    ``name -> result dict`` that waits for that example's run."""
    import json
    import time

    selected = [item.callspec.params["path"] for item in request.session.items
                if getattr(item, "originalname", None) == SMOKE_TEST]
    n = max(1, min(os.cpu_count() or 1, len(selected)))
    shares, load = [[] for _ in range(n)], [0] * n
    for path in sorted(selected, key=lambda p: -COST.get(p.name, 8)):  # heaviest first
        i = load.index(min(load))
        shares[i].append(str(path))
        load[i] += COST.get(path.name, 8)
    out_dir = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, JAXPRUNE_SMOKE="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    workers = [subprocess.Popen([sys.executable, __file__, str(out_dir), *share], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for share in shares if share]

    def result(name):
        path = out_dir / f"{name}.json"
        deadline = time.monotonic() + 1800
        while not path.exists():
            crashed = [w for w in workers if w.poll() not in (None, 0)]
            assert not crashed, crashed[0].stdout.read()[-3000:]
            if all(w.poll() is not None for w in workers) and not path.exists():
                pytest.fail(f"no worker ran {name}")
            assert time.monotonic() < deadline, f"{name} timed out"
            time.sleep(0.2)
        return json.loads(path.read_text())

    yield result
    for w in workers:
        w.wait(timeout=1800)


@pytest.mark.slow
@pytest.mark.examples
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_tiny_settings_and_prints_its_evidence(path, smoke_runs):
    run = smoke_runs(path.name)
    assert run["status"] == 0, f"{path.name} failed:\n{run['stderr'][-3000:]}"
    out = run["stdout"]
    for pattern in EVIDENCE[path.name]:
        assert re.search(pattern, out), f"{path.name} did not print {pattern!r}:\n{out[-3000:]}"
    for figure in re.findall(r"figure: (\S+)", out):
        assert (pathlib.Path(run["work"]) / figure).stat().st_size > 1000, figure
    assert not run["leftovers"], f"{path.name} left temporary files behind: {run['leftovers']}"


if __name__ == "__main__":  # a smoke-run worker (see ``smoke_runs``)
    run_in_this_process(sys.argv[2:], pathlib.Path(sys.argv[1]))
