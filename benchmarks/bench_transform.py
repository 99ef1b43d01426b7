"""Training-step cost of ``optax.chain(adam, jaxprune.prune(...))`` vs plain adam.

For MLPs of ~0.3M and ~20M parameters this prints the median time of a full
jitted training step (forward, backward, optimizer, masks) for plain adam, for
adam + prune on an ordinary step, and for adam + prune on two kinds of
mask-update step (global magnitude threshold over all kernels): "update"
recomputes the mask at a constant 90% (the threshold sits between the
already-pruned weights and the smallest live one), "gradual" raises the
sparsity a little at every step as gradual pruning does (the threshold falls
among live weights, where equal magnitudes often have to be split). Timings
of the four variants are interleaved so that machine noise hits them alike.

    python benchmarks/bench_transform.py [--quick] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import functools
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import optax

import jaxprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = {"0.3M": (256, 512, 256, 10), "20M": (1024, 4096, 3072, 1024)}


def init(sizes, key=jax.random.key(0)):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {"kernel": jax.random.normal(sub, (a, b)) / a ** 0.5,
                                "bias": jnp.zeros(b)}
    return params


def loss_fn(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        x = jax.nn.relu(x) if i < n - 1 else x
    return jnp.mean(x ** 2)


def make_step(tx):
    # Donated like a real training loop: new params/state reuse the old buffers.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, x):
        grads = jax.grad(loss_fn)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    return step


def variants() -> dict:
    return {
        "adam": optax.adam(1e-3),
        # Masks set at step 0 only: every later step is an ordinary step.
        "prune": optax.chain(optax.adam(1e-3), jaxprune.prune(
            sparsity=jaxprune.schedules.constant(0.9), scope="global")),
        # Masks recomputed on every step (global magnitude threshold).
        "update": optax.chain(optax.adam(1e-3), jaxprune.prune(
            sparsity=jaxprune.schedules.constant(0.9, every=1), scope="global")),
        # Sparsity 50% at step 0, then a little higher at every step.
        "gradual": optax.chain(optax.adam(1e-3), jaxprune.prune(
            sparsity=jaxprune.schedules.polynomial(0.95, begin=0, end=100_000, every=1,
                                                   power=1, initial=0.5),
            scope="global")),
    }


def measure(sizes, batch: int, repeats: int) -> dict:
    """Per variant: compile seconds, and step times of ``repeats`` interleaved rounds."""
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]))
    carries, steps, compile_s = {}, {}, {}
    for key, tx in variants().items():
        params = init(sizes)
        state = tx.init(params)
        t = time.perf_counter()
        steps[key] = make_step(tx).lower(params, state, x).compile()
        compile_s[key] = time.perf_counter() - t
        carries[key] = steps[key](params, state, x)  # step 0
        carries[key] = steps[key](*carries[key], x)
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for key in steps:  # interleaved so that noise hits all four alike
            start = time.perf_counter()
            carries[key] = jax.block_until_ready(steps[key](*carries[key], x))
            times[key].append(time.perf_counter() - start)
    return {"times": times, "compile": compile_s}


def run(quick: bool = False, repeats: Optional[int] = None, batch: int = 32) -> str:
    """Markdown: step time of the four variants, compile time, and the ratios."""
    import harness
    repeats = repeats or (5 if quick else 20)
    rows = []
    for name, sizes in SIZES.items():
        if quick and name != "0.3M":
            continue
        n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        r = measure(sizes, batch, repeats)
        t, c = r["times"], r["compile"]
        rows.append([name, f"{n / 1e6:.2f}M", *[harness.ms(t[k]) for k in t],
                     f"{100 * (harness.ratio(t['prune'], t['adam']) - 1):+.1f}%",
                     f"{harness.ratio(t['update'], t['prune']):.2f}x",
                     f"{harness.ratio(t['gradual'], t['prune']):.2f}x",
                     " / ".join(f"{c[k]:.1f}" for k in c)])
    return "\n".join([
        "## Training step: optax vs optax + prune", "",
        "A full jitted, donated training step (forward, backward, Adam, masks) of an MLP: plain "
        "`adam`; `chain(adam, prune)` on an ordinary step (masks fixed after step 0); a mask-"
        "update step at a constant 90% (`every=1`, global magnitude threshold); a gradual step "
        "(the sparsity rises at every step, so the threshold falls among live weights). "
        f"Batch {batch}; step times in ms, median (min–max) of {repeats} interleaved rounds; "
        "ratios are medians of per-round ratios. Compile: seconds for `lower().compile()` of "
        "each variant.", "",
        harness.table(["model", "params", "adam ms", "+prune ms", "update step ms",
                       "gradual step ms", "prune overhead", "update / ordinary",
                       "gradual / ordinary", "compile s adam / prune / update / gradual"],
                      rows)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="0.3M only, fewer repeats")
    args = parser.parse_args(argv)
    print(run(args.quick, args.repeats, args.batch))


if __name__ == "__main__":
    main()
