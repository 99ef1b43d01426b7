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

    python benchmarks/bench_checkpoint.py [--params 100_000_000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune import checkpoint
from jaxprune.checkpoint import _integrity, _state


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    state = make_state(args.params)
    leaves = jax.tree.leaves(state)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_bytes = sum(x.nbytes for x in leaves)
    print(f"jax {jax.__version__}, orbax {ocp.__version__}, {jax.devices()[0].platform}; "
          f"{n_params / 1e6:.1f}M float32 params + bool masks = {n_bytes / 1e6:.0f} MB")

    compile_s = timed(lambda: _integrity.checksums(leaves))
    sums, crc, sums_cpu, crc_cpu = [], [], [], []
    for _ in range(args.repeats):
        sums.append(timed(lambda: _integrity.checksums(leaves), sums_cpu))
        host = [np.asarray(x) for x in leaves]  # on CPU a view, elsewhere a device-to-host copy
        crc.append(timed(lambda: [zlib.crc32(h) for h in host], crc_cpu))
    med = statistics.median
    print(f"checksum pass (jitted, on device): {med(sums):.3f} s wall, {med(sums_cpu):.3f} s CPU "
          f"(first call compiles: {compile_s:.2f} s); zlib.crc32 on host bytes: "
          f"{med(crc):.3f} s wall, {med(crc_cpu):.3f} s CPU")

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    abstract = jax.eval_shape(lambda: state)
    times = {k: [] for k in ("save orbax", "save jaxprune", "restore orbax",
                             "restore jaxprune verify=False", "restore jaxprune verify=True")}
    cpu = {k: [] for k in times}
    try:
        with checkpoint.manager(root / "warmup") as mngr:  # compiles the checksum passes
            checkpoint.save(mngr, 0, state)
            first = timed(lambda: jax.block_until_ready(checkpoint.restore(mngr, abstract)))
        shutil.rmtree(root / "warmup")
        print(f"first verified restore in this process (compiles once): {first:.3f} s")
        for r in range(args.repeats):
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
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    for label, data in (("wall", times), ("CPU", cpu)):
        m = {k: statistics.median(v) for k, v in data.items()}
        for k, v in data.items():
            print(f"{k:30s} {label:4s} median {m[k]:7.3f} s   runs "
                  f"{', '.join(f'{t:.3f}' for t in v)}")
        print(f"  ({label}) save with checksums / plain orbax save:         "
              f"{m['save jaxprune'] / m['save orbax']:.3f}")
        print(f"  ({label}) restore verified / plain orbax restore:         "
              f"{m['restore jaxprune verify=True'] / m['restore orbax']:.3f}")
        print(f"  ({label}) restore verified / jaxprune restore unverified: "
              f"{m['restore jaxprune verify=True'] / m['restore jaxprune verify=False']:.3f}")


if __name__ == "__main__":
    main()
