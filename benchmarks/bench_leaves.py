"""Compile time and mask-update cost as the number of leaves grows.

MLPs of ``L`` layers of ``d x d`` kernels (``L`` leaves, ``x -> tanh(x @ W)``)
trained by a jitted step (forward, backward, optimizer, masks). Variants:
plain ``optax.adam``; ``adam + jaxprune.prune`` (90% magnitude) whose masks
are set at step 0 only ("ordinary" steps), or recomputed at every step with
local or global scope ("update" steps); ``jaxprune.pruned(adam)`` updating
masks every step; ``jaxprune.rigl(adam)`` and ``jaxprune.sparse_evolutionary(adam)`` (SET)
dropping and growing every step.

Compile time is ``jax.jit(step).lower(...).compile()`` (tracing included,
a fresh ``jit`` each time so no cache is hit). Step times are interleaved
round by round; ratios are medians of per-round ratios against plain adam
in the same round. Figures: median [min-max] over the repeats.

    python benchmarks/bench_leaves.py [--quick] [--leaves 8 128 512] [--width 256]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxprune

FULL = dict(leaves=(8, 128, 512), width=256, compile_repeats=2, step_repeats=7)
QUICK = dict(leaves=(8, 32), width=64, compile_repeats=1, step_repeats=5)


def init(n_leaves: int, width: int, key=jax.random.key(0)) -> dict:
    keys = jax.random.split(key, n_leaves)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (width, width)) / width ** 0.5}
            for i, k in enumerate(keys)}


def loss_fn(params, x):
    for i in range(len(params)):
        x = jnp.tanh(x @ params[f"Dense_{i}"]["kernel"])
    return jnp.mean(x ** 2)


def variants() -> dict:
    adam = optax.adam(1e-3)
    every = jaxprune.schedules.constant(0.9, every=1)
    return {
        "adam": adam,
        # Masks set at step 0 only: every step measured is an ordinary step.
        "ordinary": optax.chain(adam, jaxprune.prune(
            sparsity=jaxprune.schedules.constant(0.9), scope="local")),
        "local": optax.chain(adam, jaxprune.prune(sparsity=every, scope="local")),
        "global": optax.chain(adam, jaxprune.prune(sparsity=every, scope="global")),
        "pruned": jaxprune.pruned(adam, sparsity=every, scope="local"),
        "rigl": jaxprune.rigl(adam, 0.9, every=1, end=10**9, distribution="uniform"),
        "set": jaxprune.sparse_evolutionary(adam, 0.9, every=1, end=10**9,
                                            distribution="uniform"),
    }


def make_step(tx):
    def step(params, state, x):
        grads = jax.grad(loss_fn)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    return step


def _fmt(values, unit_scale=1.0, digits=2) -> str:
    v = [x * unit_scale for x in values]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def measure(n_leaves: int, width: int, compile_repeats: int, step_repeats: int,
            names=None) -> dict:
    txs = variants()
    names = list(names or txs)
    x = jax.random.normal(jax.random.key(1), (32, width))
    compile_s = {k: [] for k in names}
    compiled, carries = {}, {}
    for name in names:
        tx = txs[name]
        params = init(n_leaves, width)
        state = tx.init(params)
        step = make_step(tx)
        for _ in range(compile_repeats):
            start = time.perf_counter()
            # A fresh jit each time: nothing is reused from a cache.
            exe = jax.jit(functools.partial(step), donate_argnums=(0, 1)).lower(
                params, state, x).compile()
            compile_s[name].append(time.perf_counter() - start)
        compiled[name] = exe
        carry = exe(params, state, x)          # step 0 (masks set)
        carries[name] = jax.block_until_ready(exe(*carry, x))
    step_s = {k: [] for k in names}
    for _ in range(step_repeats):
        for name in names:  # interleaved: machine noise hits all variants alike
            start = time.perf_counter()
            carries[name] = jax.block_until_ready(compiled[name](*carries[name], x))
            step_s[name].append(time.perf_counter() - start)
    del carries
    return dict(compile=compile_s, step=step_s)


def table(results: dict, width: int) -> str:
    names = list(next(iter(results.values()))["compile"])
    lines = [f"Compile time (s) of the jitted training step, MLP of L leaves of {width}x{width}; "
             "ratio: median / plain adam's median.", "",
             "| leaves | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for n, r in results.items():
        base = statistics.median(r["compile"]["adam"])
        cells = [f"{_fmt(r['compile'][k])} ({statistics.median(r['compile'][k]) / base:.1f}x)"
                 for k in names]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Step time (ms), same models; ratio: median of per-round ratios to plain "
              "adam (ordinary: masks fixed; local/global/pruned/rigl/set: masks recomputed every "
              "step).", "",
              "| leaves | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for n, r in results.items():
        t = r["step"]
        cells = []
        for k in names:
            ratio = statistics.median(a / b for a, b in zip(t[k], t["adam"]))
            cells.append(f"{_fmt(t[k], 1e3)} ({ratio:.2f}x)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool = False, leaves=None, width=None, names=None) -> str:
    """Runs the measurements and returns them as a Markdown section."""
    cfg = dict(QUICK if quick else FULL)
    if leaves:
        cfg["leaves"] = tuple(leaves)
    if width:
        cfg["width"] = width
    results = {}
    for n in cfg["leaves"]:
        results[n] = measure(n, cfg["width"], cfg["compile_repeats"], cfg["step_repeats"], names)
    head = (f"## Leaves: compile time and mask-update cost vs number of leaves\n\n"
            f"`python benchmarks/bench_leaves.py{' --quick' if quick else ''}` "
            f"({jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}); "
            "median [min-max].\n\n")
    return head + table(results, cfg["width"]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--leaves", type=int, nargs="*")
    parser.add_argument("--width", type=int)
    parser.add_argument("--variants", nargs="*", help="subset of: " + " ".join(variants()))
    args = parser.parse_args(argv)
    names = args.variants
    if names and "adam" not in names:
        names = ["adam"] + names
    print(run(args.quick, args.leaves, args.width, names))


if __name__ == "__main__":
    main()
