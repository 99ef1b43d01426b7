"""Mask throughput: unstructured (local and global), N:M, block and channel masks.

Times one jitted mask computation from magnitude scores over MLP-like float32
leaves (2048 x 2048 each), all variants interleaved round by round, and
reports millions of weights per second and the time relative to the local
unstructured mask measured in the same rounds.

    python benchmarks/bench_masks.py [--quick] [--params 32]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp

import jaxprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_scores(n_million: float, side: int = 2048) -> dict:
    leaves = max(1, round(n_million * 1e6 / side ** 2))
    keys = jax.random.split(jax.random.key(0), leaves)
    return jax.block_until_ready(
        {f"layer_{i}": {"kernel": jnp.abs(jax.random.normal(k, (side, side)))}
         for i, k in enumerate(keys)})


VARIANTS = {
    "unstructured, local 90%": lambda s: jaxprune.masks.unstructured(s, 0.9),
    "unstructured, global 90%": lambda s: jaxprune.masks.unstructured(s, 0.9, scope="global"),
    "N:M 2:4": lambda s: jaxprune.masks.n_of_m(s, 2, 4),
    "block 4x4, 90%": lambda s: jaxprune.masks.block(s, 0.9, (4, 4)),
    "channels (columns), 50%": lambda s: jaxprune.masks.channels(s, 0.5),
}


def run(quick: bool = False, params: Optional[float] = None,
        repeats: Optional[int] = None) -> str:
    """Markdown: per mask kind, time (median, min–max), throughput and ratio."""
    import harness
    params = params or (4.0 if quick else 33.5)
    repeats = repeats or (3 if quick else 10)
    scores = make_scores(params)
    n = sum(x.size for x in jax.tree.leaves(scores))
    fns = {k: jax.jit(f) for k, f in VARIANTS.items()}
    t = harness.interleaved({k: (lambda f=f: jax.block_until_ready(f(scores)))
                             for k, f in fns.items()}, repeats)
    base = "unstructured, local 90%"
    rows = [[k, harness.ms(v, 1), f"{n / 1e6 / harness.med(v):.0f}",
             f"{harness.ratio(v, t[base]):.2f}"] for k, v in t.items()]
    return "\n".join([
        "## Mask throughput: unstructured, N:M, block, channel", "",
        f"One jitted mask computation from magnitude scores over {n / 1e6:.1f}M weights "
        f"({len(scores)} leaves of 2048 x 2048); ms as median (min–max) of {repeats} "
        "interleaved rounds (after one compile-and-warm-up round); ratio to the local "
        "unstructured mask from the same rounds.", "",
        harness.table(["mask", "ms", "M weights / s", "time / local unstructured"], rows)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--params", type=float, default=None, help="millions of weights")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    print(run(args.quick, args.params, args.repeats))


if __name__ == "__main__":
    main()
