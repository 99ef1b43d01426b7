"""Structured pruning of a transformer: remove 25/50/75% of the attention heads
and MLP channels for real, fine-tune, and measure accuracy against speed-up.

A small Flax Linen transformer classifies MNIST digits read as sequences of
28 rows. jaxprune traces it to a jaxpr and finds the coupled groups (DepGraph,
Fang et al. 2023): the heads of each attention layer (query/key/value kernels
and the output projection together), each head's dimension, each MLP's hidden
channels and the residual stream. Only whole heads and MLP channels are
removed here (Michel et al. 2019 for heads); the residual width stays.

    python examples/structured_transformer.py [--steps 300] [--finetune 100]
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from jaxprune.report import flops

import common


class Block(nn.Module):
    heads: int
    dim: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(
            nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(self.hidden, name="mlp_in")(nn.LayerNorm()(x)))
        return x + nn.Dense(self.dim, name="mlp_out")(h)


class Transformer(nn.Module):
    """Rows of the image are tokens; mean-pooled for the class logits."""

    heads: int = 8
    dim: int = 64
    hidden: int = 128
    depth: int = 2

    @nn.compact
    def __call__(self, rows):                                        # (batch, rows, pixels)
        x = nn.Dense(self.dim)(rows)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(self.depth):
            x = Block(self.heads, self.dim, self.hidden)(x)
        return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))


def heads_or_mlp(group) -> bool:
    """Groups removed here: the heads axis of attention, or an MLP's hidden axis."""
    heads = any(p.endswith(("query/kernel", "key/kernel", "value/kernel")) and a == 1
                for p, a in group.members)
    mlp = any(p.endswith("mlp_in/kernel") and a == 1 for p, a in group.members)
    return heads or mlp


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=300, help="dense training steps")
    p.add_argument("--finetune", type=int, default=100, help="fine-tune steps per pruned model")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    p.add_argument("--out", default="structured_transformer_out", help="directory for the plot")
    args = common.parse_args(p, argv, smoke=dict(steps=2, finetune=2, chunk=2, sparsities=[0.5],
                                                 heads=4, dim=16, depth=1, limit=128,
                                                 repeats=2, batch=16, latency_batch=16))
    start = time.perf_counter()
    (x, y), (xt, yt) = common.images(args.data, args.limit)
    x, xt = x[..., 0], xt[..., 0]  # images as sequences of rows
    model = Transformer(args.heads, args.dim, 2 * args.dim, args.depth)
    variables = jax.jit(model.init)(common.key(0), jnp.asarray(x[:2]))

    def fit(apply, params, steps, desc):
        loss = lambda p, aux, xb, yb: (common.cross_entropy(apply({"params": p}, xb), yb), aux)
        run = common.chunk_runner(loss, optax.adam(1e-3), x, y)
        state = (params, None, optax.adam(1e-3).init(params))
        return common.train(run, state, steps, batch_size=args.batch, n_train=len(x),
                            chunk=args.chunk, desc=desc)[0]

    dense = {"params": fit(model.apply, variables["params"], args.steps, "dense")}
    example = jnp.asarray(x[:args.batch])
    found = jaxprune.structured.groups(model.apply, dense, example)
    removable = [g for g in found if heads_or_mlp(g)]
    print(f"{len(found)} coupled groups; removing channels from {len(removable)} of them:")
    for g in removable:
        print(" ", str(g).replace("\n", "\n  "))

    models = {"dense": dict(apply=jax.jit(model.apply), variables=dense, acc0=None)}
    for s in args.sparsities:
        r = jaxprune.structured.prune_channels(model, dense, example, sparsity=s,
                                               ignore=lambda g: not heads_or_mlp(g))
        acc0 = common.accuracy(r.apply, r.variables, xt, yt)
        tuned = {"params": fit(r.apply, r.variables["params"], args.finetune,
                               f"fine-tune {s:.0%}")}
        models[f"{s:.0%} heads+MLP removed"] = dict(apply=r.apply, variables=tuned, acc0=acc0)

    xl = jnp.asarray(xt[:args.latency_batch])
    medians, compiled = common.compare_latency(
        {k: (m["apply"], (m["variables"], xl)) for k, m in models.items()}, args.repeats)
    t_dense = medians["dense"]
    rows, points = [], []
    for k, m in models.items():
        q = m["variables"]["params"]["Block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        acc = common.accuracy(m["apply"], m["variables"], xt, yt)
        t = medians[k]
        points.append((t_dense / t, acc, k))
        rows.append([k, q.shape[1], f"{jaxprune.structured.param_count(m['variables']):,}",
                     "-" if m["acc0"] is None else f"{m['acc0']:.4f}", f"{acc:.4f}",
                     common.si(flops(m["apply"], m["variables"], xl[:1])),
                     f"{t * 1e3:.2f} ms", f"{t_dense / t:.2f}x"])
    print(f"\nlatency: forward of {len(xl)} sequences, median of {args.repeats} runs on "
          f"{jax.devices()[0].platform}")
    print(common.table(["model", "heads", "params", "acc pruned", "acc fine-tuned", "FLOPs/seq",
                        "latency", "speed-up"], rows))

    figure = common.speedup_plot(points, 'removing attention heads and MLP channels', args.out, 'structured_transformer.png')
    print(f"figure: {figure}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
