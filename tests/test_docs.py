"""The README and docs/ run as written, and the API reference is complete.

* Every README ```python block runs on its own in a fresh interpreter (one
  subprocess per block, on one CPU device as a first try on a laptop would),
  followed by a check of what the block claims.
* The blocks of each docs/*.md page run in order in one fresh interpreter;
  docs/scaling.md on 1 and on 8 (simulated) devices.
* Every public name has a docstring (fast), and the Sphinx site builds with
  warnings as errors (slow; needs the ``docs`` extra).
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MULTI_DEVICE_PAGES = {"scaling.md"}


def _load_apigen():
    if "apigen" not in sys.modules:  # docs/apigen.py, the generator of the API reference
        spec = importlib.util.spec_from_file_location("apigen", ROOT / "docs" / "apigen.py")
        sys.modules["apigen"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["apigen"])
    return sys.modules["apigen"]


def _blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def _env(devices):
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# Runs the snippets given as file names, in order, in one namespace; then prints the
# device count, so that the test knows the snippets saw the devices it asked for.
RUNNER = """
import sys
ns = {"__name__": "__main__"}
for path in sys.argv[1:]:
    exec(compile(open(path).read(), path, "exec"), ns)
import jax
print("devices:", jax.device_count())
"""


def _run(snippets, tmp_path, devices=1):
    files = []
    for i, (name, source) in enumerate(snippets):
        path = tmp_path / f"{i}_{re.sub(r'[^A-Za-z0-9_.]+', '_', name)}.py"
        path.write_text(source)
        files.append(str(path))
    proc = subprocess.run([sys.executable, "-c", RUNNER, *files], cwd=tmp_path, env=_env(devices),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.stdout.rstrip().endswith(f"devices: {devices}"), proc.stdout[-500:]
    return proc.stdout


# What each README block claims, checked in the block's own namespace. Keyed by a
# line of the block; test_every_readme_check_finds_its_block keeps them attached.
README_CHECKS = {
    'masks = jaxprune.masks.unstructured(scores, 0.9, scope="global")': """
kernels = [m for m in jax.tree.leaves(masks)]
n = sum(m.size for m in kernels)
assert len(kernels) == 2 and masks["Dense_0"]["bias"] is None
assert sum(int((~m).sum()) for m in kernels) == round(0.9 * n)  # "exactly round(0.9 * n) pruned"
assert all(float(abs(sparse[k]["kernel"][~masks[k]["kernel"]]).max()) == 0.0 for k in masks)
k = nm["Dense_0"]["kernel"]                                      # 2:4 along axis 0
assert (k.reshape(-1, 4, k.shape[1]).sum(axis=1) == 2).all()
""",
    "for _ in range(1001):": """
n = sum(m.size for m in jax.tree.leaves(masks))
assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == round(0.9 * n)
for k in masks:  # pruned weights are exactly 0.0 after training
    assert float(abs(params[k]["kernel"][~masks[k]["kernel"]]).max()) == 0.0
""",
    "tx = jaxprune.pruned(optax.adam(1e-3)": """
assert int(state.prune_state.count) == 1
""",
    "jaxprune.rigl(optax.sgd(0.1, momentum=0.9)": """
assert logits.shape == (8, 10)
for k in jax.tree.leaves(jaxprune.masks_of(state)):   # STE masks are 2:4 along axis 0
    assert (k.reshape(-1, 4, k.shape[1]).sum(axis=1) == 2).all()
""",
    'jaxprune.oneshot(mlp, variables, batches, method="sparsegpt", sparsity="2:4")': """
assert float(jaxprune.sparsity(masks)) == 0.5
assert small.variables["fc1"]["kernel"].shape == (32, 16)
""",
    "result = jaxprune.structured.prune_channels(model, variables, x": """
assert result.variables["params"]["Dense_0"]["kernel"].shape == (32, 32)
assert result.params_after < result.params_before
assert float(jnp.abs(y - model.apply(masked, x)).max()) < 1e-5
""",
}


def _readme_cases():
    text = README.read_text()
    cases = []
    for block in _blocks(README):
        heading = re.findall(r"^## (.*)$", text[:text.index(block)], re.M)
        # Blocks that build a Flax model take longest (flax import, tracing): slow.
        marks = [pytest.mark.slow] if re.search(r"^import .*\bflax\b|^from flax", block, re.M) else []
        cases.append(pytest.param(block, id=f"{len(cases)}-{(heading or ['top'])[-1][:30]}",
                                  marks=marks))
    return cases


def test_every_readme_check_finds_its_block():
    blocks = _blocks(README)
    for key in README_CHECKS:
        assert sum(key in b for b in blocks) == 1, f"README check {key!r} matches no single block"


@pytest.mark.parametrize("block", _readme_cases())
def test_readme_block_runs_alone_in_a_fresh_interpreter(block, tmp_path):
    checks = [c for key, c in README_CHECKS.items() if key in block]
    _run([("README block", block)] + [("README check", c) for c in checks], tmp_path)


def _page_cases():
    cases = []
    for page in PAGES:
        if not _blocks(page):
            continue
        for devices in ((1, 8) if page.name in MULTI_DEVICE_PAGES else (1,)):
            cases.append(pytest.param(page, devices, id=f"{page.name}-{devices}dev",
                                      marks=pytest.mark.slow))
    return cases


def test_scaling_page_is_tested_on_one_and_eight_devices():
    ids = [c.id for c in _page_cases()]
    assert "scaling.md-1dev" in ids and "scaling.md-8dev" in ids


@pytest.mark.parametrize("page,devices", _page_cases())
def test_doc_page_snippets_run_in_order(page, devices, tmp_path):
    # tmp_path is the working directory: snippets that write checkpoints write there.
    _run([(f"{page.name}[snippet {i}]", b) for i, b in enumerate(_blocks(page))], tmp_path,
         devices)


def test_every_public_name_has_a_docstring():
    apigen = _load_apigen()
    public, others = apigen.modules()
    missing = [m for m in public + others if not (sys.modules[m].__doc__ or "").strip()]
    for rows in apigen.entries().values():
        missing += [e.canonical for e in rows
                    if e.is_canonical and apigen.kind(e.obj) != "module" and not apigen.docstring(e)]
    assert not missing, f"public names without a docstring: {missing}"


def test_api_reference_lists_every_public_name(tmp_path):
    import jaxprune

    apigen = _load_apigen()
    apigen.write(tmp_path)
    pages = {p.stem: p.read_text() for p in tmp_path.glob("*.rst")}
    public, _ = apigen.modules()
    assert public[0] == "jaxprune" and {"jaxprune.masks", "jaxprune.structured"} <= set(public)
    for name in jaxprune.__all__:  # a row of the summary table, or a constant's link
        assert re.search(rf"^   ~?(jaxprune\.)?{re.escape(name)}$|:py:data:`{re.escape(name)} ",
                         pages["jaxprune"], re.M), name
    for modname, rows in apigen.entries().items():
        for e in rows:
            if apigen.kind(e.obj) == "module":
                assert e.canonical in pages, f"{e.full_name} has no page"
                continue
            home = pages[e.canonical.rsplit(".", 1)[0]]  # documented once, with its signature
            assert re.search(rf"^\.\. (auto\w+|py:data):: {re.escape(e.canonical.rsplit('.', 1)[1])}$",
                             home, re.M), e.canonical


def test_docstring_checks_catch_a_missing_docstring():
    apigen = _load_apigen()

    def undocumented():
        pass

    class Auto(tuple):
        __doc__ = "Auto(a, b)"  # what NamedTuple and dataclass generate

    assert apigen.docstring(apigen.Entry("m", "f", undocumented, "m.f")) is None
    assert apigen.docstring(apigen.Entry("m", "Auto", Auto, "m.Auto")) is None
    assert apigen.data_doc("jaxprune.transform", "STATIC_ARGS")
    assert apigen.data_doc("jaxprune", "STATIC_ARGS")   # re-exported: read where it is assigned
    assert apigen.data_doc("jaxprune.transform", "PyTree") is None


@pytest.mark.slow
def test_sphinx_site_builds_with_warnings_as_errors(tmp_path):
    # docs/build.sh as the README says to run it (CI builds the site here, beside the other
    # slow tests), its python this interpreter and its output in tmp_path.
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    env = dict(_env(1), JAXPRUNE_DOCS_OUT=str(tmp_path / "html"))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    proc = subprocess.run(["bash", str(ROOT / "docs" / "build.sh"), "-q",
                           "-d", str(tmp_path / "doctrees")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    api = (tmp_path / "html" / "api" / "jaxprune.html").read_text()
    assert 'id="jaxprune.prune"' in api and 'id="jaxprune.masks.unstructured"' in (
        tmp_path / "html" / "api" / "jaxprune.masks.html").read_text()
