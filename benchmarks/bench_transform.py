"""Training-step cost of ``optax.chain(adam, jaxprune.prune(...))`` vs plain adam.

For MLPs of ~0.3M and ~20M parameters this prints the median time of a full
jitted training step (forward, backward, optimizer, masks) for plain adam, for
adam + prune on an ordinary step, and for adam + prune on a mask-update step
(global magnitude threshold over all kernels), and the ratios. Timings of the
three variants are interleaved so that machine noise hits them alike.

    python benchmarks/bench_transform.py [--repeats 20]
"""

from __future__ import annotations

import argparse
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
    @jax.jit
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
          f"{'overhead':>9} {'update/step':>12}")
    for name, sizes in SIZES.items():
        params = init(sizes)
        n = sum(x.size for x in jax.tree.leaves(params))
        x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
        adam = optax.adam(1e-3)
        # Masks update at step 0 only, so a state at count 1 takes ordinary steps.
        pruning = optax.chain(optax.adam(1e-3), jaxprune.prune(
            sparsity=jaxprune.schedules.constant(0.9), scope="global"))
        base_step, prune_step = make_step(adam), make_step(pruning)
        base_state = adam.init(params)
        update_state = pruning.init(params)
        _, ordinary_state = prune_step(params, update_state, x)  # now at count 1
        runs = {"adam": (base_step, base_state), "prune": (prune_step, ordinary_state),
                "update": (prune_step, update_state)}
        times = {k: [] for k in runs}
        for fn, st in runs.values():
            jax.block_until_ready(fn(params, st, x))
        for _ in range(args.repeats):
            for key, (fn, st) in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, st, x))
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{name:>6} {n / 1e6:>7.2f}M {med['adam']:>9.2f} {med['prune']:>10.2f} "
              f"{med['update']:>10.2f} {100 * (med['prune'] / med['adam'] - 1):>8.1f}% "
              f"{med['update'] / med['prune']:>11.2f}x")


if __name__ == "__main__":
    main()
