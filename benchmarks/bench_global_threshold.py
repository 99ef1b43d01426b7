"""Global magnitude mask: radix select (jaxprune) vs concatenate + sort.

Prints, for each model size, the time of one jitted global mask computation
both ways, their ratio, the cost per million parameters (linear growth), and
XLA's temporary-buffer size for each (the sort needs a concatenated copy of
all scores; the radix select needs only histograms and the masks).

    python benchmarks/bench_global_threshold.py [--sizes 10 25] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import jaxprune


def make_params(n_million: float, key=jax.random.key(0)):
    """MLP-like leaves of 1024 x 4096 (and one remainder leaf) totalling
    ``n_million`` million weights."""
    total, width = int(n_million * 1e6), 1024
    params, i = {}, 0
    while total > 0:
        rows = min(4 * width, max(total // width, 1))
        key, sub = jax.random.split(key)
        params[f"layer_{i}"] = jax.random.normal(sub, (rows, width))
        total -= rows * width
        i += 1
    return params


def sort_baseline(params, sparsity):
    scores = jaxprune.scores.magnitude(params)
    flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(scores)])
    k = jnp.round(sparsity * flat.size).astype(jnp.int32)
    thresh = jnp.sort(flat)[jnp.maximum(k - 1, 0)]
    return jax.tree.map(lambda s: s > thresh, scores)


def radix_select(params, sparsity):
    return jaxprune.masks.unstructured(jaxprune.scores.magnitude(params), sparsity,
                                       scope="global")


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def temp_bytes(fn, *args) -> int:
    stats = fn.lower(*args).compile().memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", -1)) if stats is not None else -1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 25],
                        help="model sizes in millions of parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    base, ours = jax.jit(sort_baseline), jax.jit(radix_select)
    s = jnp.float32(args.sparsity)
    print(f"{'params':>10} {'sort (s)':>10} {'radix (s)':>10} {'ratio':>7} "
          f"{'radix ms/M':>10} {'sort temp MB':>12} {'radix temp MB':>13}")
    for size in args.sizes:
        params = make_params(size)
        n = sum(x.size for x in jax.tree.leaves(params))
        m_ours = ours(params, s)
        pruned = sum(int((~m).sum()) for m in jax.tree.leaves(m_ours))
        # The sparsity is passed traced (float32), as a schedule would pass it.
        assert pruned == round(float(s) * n), (pruned, n)
        t_base = timed(base, params, s, repeats=args.repeats)
        t_ours = timed(ours, params, s, repeats=args.repeats)
        print(f"{n / 1e6:>9.1f}M {t_base:>10.3f} {t_ours:>10.4f} {t_base / t_ours:>6.1f}x "
              f"{1e3 * t_ours / (n / 1e6):>10.2f} {temp_bytes(base, params, s) / 2**20:>12.1f} "
              f"{temp_bytes(ours, params, s) / 2**20:>13.1f}")
        del params, m_ours


if __name__ == "__main__":
    main()
