"""Train-mode speed of a shrunk transformer block: dropout bits at the reduced shape.

Run:  python benchmarks/bench_structured_dropout.py [--quick]

A pre-LN transformer block (Flax Linen, dropout 0.1 after attention, in the MLP
and on the residual) is pruned to half its heads and half its MLP width. For a
training step (loss and gradients, jitted) it prints the latency (best of
interleaved repeated runs) and XLA-counted FLOPs of:
  dense     the original block
  exact     shrunk, random bits drawn at the full shape and cut (random_bits="exact",
            bit-identical to the masked dense model: the behaviour before this option)
  reduced   shrunk, random bits drawn at the reduced shape (the default; the same
            distribution as the masked model's)
and the ratios dense/exact and dense/reduced measured in the same run, with the
number of random bits each step draws (counted in the jaxpr: noise-free).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_structured import flops, latency_samples  # noqa: E402

from jaxprune import structured as st  # noqa: E402


class Block(nn.Module):
    d: int = 256
    heads: int = 8
    mlp: int = 1024
    rate: float = 0.1

    @nn.compact
    def __call__(self, x):
        drop = lambda h: nn.Dropout(self.rate, deterministic=False)(h)
        h = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.rate, deterministic=False)(
            nn.LayerNorm()(x))
        x = x + drop(h)
        h = drop(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
        return x + drop(nn.Dense(self.d)(h))


def random_bits_drawn(fn, *args) -> int:
    """Random values drawn by ``fn`` (``random_bits`` outputs, sub-jaxprs included)."""
    total = 0

    def walk(jaxpr):
        nonlocal total
        for e in jaxpr.eqns:
            if e.primitive.name == "random_bits":
                total += int(np.prod(e.outvars[0].aval.shape))
            for p in e.params.values():
                for q in p if isinstance(p, (tuple, list)) else [p]:
                    if hasattr(q, "eqns") or type(q).__name__ == "ClosedJaxpr":
                        walk(getattr(q, "jaxpr", q))
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return total


def run(quick: bool = False, reps: Optional[int] = None) -> str:
    """Markdown: train-step latency, FLOPs and random values drawn of the dense,
    exact-bits and reduced-bits shrunk block."""
    import harness
    b, n, d, heads, mlp, r = (2, 32, 64, 2, 256, 3) if quick else (8, 128, 256, 8, 1024, 20)
    reps = reps or r
    block = Block(d, heads, mlp)
    x = jax.random.normal(jax.random.key(0), (b, n, d))
    key = jax.random.key(1)
    v = block.init({"params": jax.random.key(2), "dropout": key}, x)
    apply = lambda v, x, k: block.apply(v, x, rngs={"dropout": k})
    # prune heads and MLP width, not the residual width
    ignore = lambda g: g.size == d
    exact = st.prune_channels(apply, v, x, key, sparsity=0.5, ignore=ignore, random_bits="exact")
    reduced = st.prune_channels(apply, v, x, key, plan=exact.plan, sparsity=0.5)

    def step(fn):
        return lambda v, x, k: jax.value_and_grad(lambda p: jnp.mean(fn(p, x, k) ** 2))(v)

    calls = {"dense": (step(apply), (v, x, key)),
             "exact": (step(exact.apply), (exact.variables, x, key)),
             "reduced": (step(reduced.apply), (reduced.variables, x, key))}
    times = latency_samples(calls, reps)
    fl = {k: flops(fn, *a) for k, (fn, a) in calls.items()}
    bits = {k: random_bits_drawn(fn, *a) for k, (fn, a) in calls.items()}
    rows = [[k, harness.ms(times[k]), f"{fl[k] / 1e9:.3f}", f"{bits[k]:,}",
             f"×{harness.ratio(times['dense'], times[k]):.2f}"] for k in calls]
    return "\n".join([
        "## Shrunk transformer block with dropout", "",
        f"A pre-LN block (d={d}, {heads} heads, MLP {mlp}, dropout 0.1, batch {b} x {n}) pruned "
        f"to half its heads and MLP width ({exact.params_before:,} → {exact.params_after:,} "
        "params); a jitted training step (loss and gradients). *exact*: random bits drawn at the "
        "full shape and cut (`random_bits=\"exact\"`, bit-identical to the masked dense model); "
        "*reduced*: bits drawn at the reduced shape (the default). Step time in ms, median "
        f"(min–max) of {reps} interleaved runs; random values counted in the jaxpr.", "",
        harness.table(["variant", "step ms", "GFLOPs", "random values", "speed-up vs dense"],
                      rows),
        "", f"Reduced vs exact: ×{harness.ratio(times['exact'], times['reduced']):.2f} "
        f"(FLOPs ratio reduced/dense {fl['reduced'] / fl['dense']:.2f})."])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per variant")
    args = ap.parse_args()
    print(run(args.quick, args.reps))


if __name__ == "__main__":
    main()
