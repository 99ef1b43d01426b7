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

    python benchmarks/bench_transform.py [--repeats 20]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"{'model':>6} {'params':>8} {'adam ms':>9} {'+prune ms':>10} {'update ms':>10} "
          f"{'gradual ms':>11} {'overhead':>9} {'update/step':>12} {'gradual/step':>13}")
    for name, sizes in SIZES.items():
        n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
        variants = {
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
        carries, steps = {}, {}
        for key, tx in variants.items():
            params = init(sizes)
            steps[key] = make_step(tx)
            carries[key] = steps[key](params, tx.init(params), x)  # compile + step 0
            carries[key] = steps[key](*carries[key], x)
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key in variants:  # interleaved so that noise hits all four alike
                start = time.perf_counter()
                carries[key] = jax.block_until_ready(steps[key](*carries[key], x))
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        # Ratios are medians of per-round ratios: the variants of one round
        # ran back to back, so slow drifts of the machine cancel out.
        ratio = {k: statistics.median(a / b for a, b in zip(times[k], times[base]))
                 for k, base in (("prune", "adam"), ("update", "prune"), ("gradual", "prune"))}
        print(f"{name:>6} {n / 1e6:>7.2f}M {med['adam']:>9.2f} {med['prune']:>10.2f} "
              f"{med['update']:>10.2f} {med['gradual']:>11.2f} "
              f"{100 * (ratio['prune'] - 1):>8.1f}% "
              f"{ratio['update']:>11.2f}x {ratio['gradual']:>12.2f}x")
        del carries


if __name__ == "__main__":
    main()
