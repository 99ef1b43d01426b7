"""Cost of checksummed checkpoints: ``jaxprune.checkpoint`` vs plain orbax.

Saves and restores one float32 state (``--params`` entries in ten leaves,
plus a bool mask per leaf like a pruning state) in four ways, interleaved so
that machine noise hits them alike:

* save: plain orbax (``CheckpointManager.save`` with the same composite of
  arrays + JSON metadata, no checksums) vs ``jaxprune.checkpoint.save``
  (checksums computed first, on device);
* restore: plain orbax vs ``jaxprune.checkpoint.restore(verify=False)`` vs
  ``restore(verify=True)`` (one jitted pass over the restored arrays).

It also times the checksum pass alone (warm; and its one-off compile) next to
``zlib.crc32`` over the same bytes on the host, the stdlib alternative, and
prints median wall and CPU times (process CPU seconds, all threads: steadier
on a shared machine) and the ratios of medians. Dirty pages are flushed before
each timed call and the order of the variants alternates between repeats.

It also compares a dense checkpoint of pruned parameters with ``export_sparse``\n(kept values + bit-packed masks) at 50/90/99% sparsity: time and bytes.\n\n    python benchmarks/bench_checkpoint.py [--quick] [--params 25_000_000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxprune
from jaxprune import checkpoint
from jaxprune.checkpoint import _integrity, _state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_state(n: int, leaves: int = 10) -> dict:
    cols = 1000
    rows = max(1, n // leaves // cols)
    keys = jax.random.split(jax.random.key(0), leaves)
    params = {f"w{i}": jax.random.normal(k, (rows, cols)) for i, k in enumerate(keys)}
    masks = {k: jnp.abs(v) > 1.0 for k, v in params.items()}
    return jax.block_until_ready({"params": params, "masks": masks})


def plain_save(mngr, step, state):
    meta = {"format": _state._FORMAT, "leaves": _state._describe(state), "user": None}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            jaxprune=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def plain_restore(mngr, step, abstract):
    return jax.block_until_ready(mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"])


def timed(fn, cpu=None):
    """Wall seconds of ``fn()``; its process CPU seconds (all threads) are
    appended to ``cpu`` -- steadier than wall time on a shared machine."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


def measure_checksums(n: int, repeats: int, directory: Optional[str] = None) -> dict:
    """Checksum pass vs zlib.crc32, and save/restore of plain orbax vs
    jaxprune.checkpoint (wall and CPU seconds per repeat)."""
    state = make_state(n)
    leaves = jax.tree.leaves(state)
    out = {"params": sum(x.size for x in jax.tree.leaves(state["params"])),
           "bytes": sum(x.nbytes for x in leaves)}
    out["compile"] = timed(lambda: _integrity.checksums(leaves))
    sums, crc, sums_cpu, crc_cpu = [], [], [], []
    for _ in range(repeats):
        sums.append(timed(lambda: _integrity.checksums(leaves), sums_cpu))
        host = [np.asarray(x) for x in leaves]  # on CPU a view, elsewhere a device-to-host copy
        crc.append(timed(lambda: [zlib.crc32(h) for h in host], crc_cpu))
    out.update(sums=sums, crc=crc, sums_cpu=sums_cpu, crc_cpu=crc_cpu)
    root = Path(directory or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    abstract = jax.eval_shape(lambda: state)
    times = {k: [] for k in ("save orbax", "save jaxprune", "restore orbax",
                             "restore jaxprune verify=False", "restore jaxprune verify=True")}
    cpu = {k: [] for k in times}
    try:
        with checkpoint.manager(root / "warmup") as mngr:  # compiles the checksum passes
            checkpoint.save(mngr, 0, state)
            out["first_restore"] = timed(
                lambda: jax.block_until_ready(checkpoint.restore(mngr, abstract)))
        shutil.rmtree(root / "warmup")
        for r in range(repeats):
            # Alternate the order and flush dirty pages first, so that neither variant
            # pays for the writeback of the other's files.
            for name in ("orbax", "jaxprune") if r % 2 == 0 else ("jaxprune", "orbax"):
                with checkpoint.manager(root / f"{name}{r}") as mngr:
                    os.sync()
                    if name == "orbax":
                        times["save orbax"].append(timed(lambda: plain_save(mngr, 0, state),
                                                         cpu["save orbax"]))
                    else:
                        times["save jaxprune"].append(timed(
                            lambda: (checkpoint.save(mngr, 0, state), mngr.wait_until_finished()),
                            cpu["save jaxprune"]))
            os.sync()
            with checkpoint.manager(root / f"jaxprune{r}") as mngr:
                order = ["orbax", False, True]
                for variant in order if r % 2 == 0 else order[::-1]:
                    if variant == "orbax":
                        times["restore orbax"].append(timed(
                            lambda: plain_restore(mngr, 0, abstract), cpu["restore orbax"]))
                        continue
                    name = f"restore jaxprune verify={variant}"
                    times[name].append(timed(lambda: jax.block_until_ready(
                        checkpoint.restore(mngr, abstract, verify=variant)), cpu[name]))
            for name in ("orbax", "jaxprune"):
                shutil.rmtree(root / f"{name}{r}")
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
    out.update(times=times, cpu=cpu)
    return out


def measure_sparse(n: int, sparsities, repeats: int) -> list:
    """Per sparsity: dense checkpoint (``save`` of the pruned params) vs
    ``export_sparse`` -- save time, bytes on disk, load time, and whether the
    loaded weights equal the saved ones."""
    params = make_state(n)["params"]
    scores = jaxprune.scores.magnitude(params)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench_sparse_export_"))
    try:
        for s in sparsities:
            masks = jaxprune.masks.unstructured(scores, s)
            pruned = jax.block_until_ready(jaxprune.apply_masks(params, masks))
            abstract = jax.eval_shape(lambda: pruned)
            t = {k: [] for k in ("dense save", "dense restore", "sparse export", "sparse load")}
            for r in range(repeats):
                d_dir, s_dir = root / f"dense_{s}_{r}", root / f"sparse_{s}_{r}"
                os.sync()
                with checkpoint.manager(d_dir) as mngr:
                    t["dense save"].append(timed(lambda: (checkpoint.save(mngr, 0, pruned),
                                                          mngr.wait_until_finished())))
                os.sync()
                info = {}
                t["sparse export"].append(timed(lambda: info.setdefault(
                    "x", checkpoint.export_sparse(s_dir, pruned, masks,
                                                  dense_checkpoint=d_dir / "0"))))
                with checkpoint.manager(d_dir) as mngr:
                    t["dense restore"].append(timed(lambda: jax.block_until_ready(
                        checkpoint.restore(mngr, abstract))))
                loaded = {}
                t["sparse load"].append(timed(lambda: loaded.setdefault(
                    "x", checkpoint.load_sparse(s_dir))))
                same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                           zip(jax.tree.leaves(pruned), jax.tree.leaves(loaded["x"][0])))
                export = info["x"]
                shutil.rmtree(d_dir)
                shutil.rmtree(s_dir)
            rows.append(dict(s=s, t=t, dense_bytes=export.dense_bytes,
                             sparse_bytes=export.sparse_bytes, raw_ratio=export.raw_ratio,
                             same=same))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def run(quick: bool = False, params: Optional[int] = None, repeats: Optional[int] = None,
        directory: Optional[str] = None) -> str:
    """Markdown: checksum overhead of save/restore, and dense vs sparse export."""
    import harness
    n = params or (1_000_000 if quick else 25_000_000)
    repeats = repeats or (2 if quick else 3)
    c = measure_checksums(n, repeats, directory)
    m = {k: harness.med(v) for k, v in c["times"].items()}
    mc = {k: harness.med(v) for k, v in c["cpu"].items()}
    rows = [[k, harness.secs(c["times"][k]), harness.secs(c["cpu"][k])] for k in c["times"]]
    ratios = [
        ["save with checksums / plain orbax save", f"{m['save jaxprune'] / m['save orbax']:.2f}",
         f"{mc['save jaxprune'] / mc['save orbax']:.2f}"],
        ["verified restore / plain orbax restore",
         f"{m['restore jaxprune verify=True'] / m['restore orbax']:.2f}",
         f"{mc['restore jaxprune verify=True'] / mc['restore orbax']:.2f}"],
        ["verified / unverified jaxprune restore",
         f"{m['restore jaxprune verify=True'] / m['restore jaxprune verify=False']:.2f}",
         f"{mc['restore jaxprune verify=True'] / mc['restore jaxprune verify=False']:.2f}"]]
    sparse = measure_sparse(n, (0.5, 0.9, 0.99), repeats)
    srows = [[f"{r['s']:.0%}", harness.secs(r["t"]["dense save"]),
              harness.secs(r["t"]["sparse export"]), harness.secs(r["t"]["dense restore"]),
              harness.secs(r["t"]["sparse load"]), f"{r['dense_bytes'] / 2**20:.1f}",
              f"{r['sparse_bytes'] / 2**20:.1f}", f"{r['sparse_bytes'] / r['dense_bytes']:.3f}",
              f"{r['raw_ratio']:.3f}", "yes" if r["same"] else "NO"] for r in sparse]
    return "\n".join([
        "## Checkpoints: checksums, dense vs export_sparse", "",
        f"A float32 state of {c['params'] / 1e6:.1f}M parameters in ten leaves plus a bool mask "
        f"per leaf ({c['bytes'] / 1e6:.0f} MB), written to local disk. Seconds, median (min–max) "
        f"of {repeats} repeats; variants alternate order and dirty pages are flushed before "
        "each timed call. CPU = process CPU seconds (all threads), steadier on a shared machine.",
        "", f"Checksum pass (jitted): {harness.secs(c['sums'])} s wall, "
        f"{harness.secs(c['sums_cpu'])} s CPU (first call compiles: {c['compile']:.2f} s); "
        f"`zlib.crc32` over the same host bytes: {harness.secs(c['crc'])} s wall. First "
        f"verified restore in a process (compiles once): {c['first_restore']:.2f} s.", "",
        harness.table(["operation", "wall s", "CPU s"], rows), "",
        harness.table(["ratio (of medians)", "wall", "CPU"], ratios), "",
        f"Pruned parameters (the {c['params'] / 1e6:.1f}M above, local magnitude masks): a dense "
        "checkpoint (`checkpoint.save`; orbax compresses, so zeros already shrink it) vs "
        "`checkpoint.export_sparse` (kept values + 1 bit per weight) and `load_sparse`. Sizes on "
        "disk; *vs raw* = sparse bytes / raw float32 bytes.", "",
        harness.table(["sparsity", "dense save s", "sparse export s", "dense restore s",
                       "sparse load s", "dense MiB", "sparse MiB", "sparse / dense",
                       "sparse / raw", "loaded == saved"], srows)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=None,
                        help="parameters (default 25M; 1M with --quick)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    print(run(args.quick, args.params, args.repeats, args.dir))


if __name__ == "__main__":
    main()
