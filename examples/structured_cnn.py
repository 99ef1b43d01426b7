"""Structured pruning of a Flax NNX CNN: remove 25/50/75% of the channels for
real, fine-tune, and measure accuracy against the measured speed-up.

The CNN has BatchNorm and a residual connection, so the outputs of two convs
are one coupled group that must lose the same channels; jaxprune finds the
groups from the jaxpr (DepGraph, Fang et al. 2023). Each shrunk model is
rebuilt as an instance of the same class at the reduced widths (``rebuild=``)
and fine-tuned with ``nnx.Optimizer`` in training mode.

    python examples/structured_cnn.py [--steps 250] [--finetune 100]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune
from jaxprune.report import flops

import common


def new_rngs() -> nnx.Rngs:
    return nnx.Rngs(common.key(0))


class CNN(nnx.Module):
    """Two strided conv blocks, a residual conv block and a linear head."""

    def __init__(self, widths=(8, 16), side=28, *, rngs: nnx.Rngs):
        c1, c2 = widths
        self.conv1 = nnx.Conv(1, c1, (3, 3), strides=2, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=2, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c2, rngs=rngs)
        self.conv3, self.bn3 = nnx.Conv(c2, c2, (3, 3), rngs=rngs), nnx.BatchNorm(c2, rngs=rngs)
        s = -(-side // 4)  # two stride-2 convs with SAME padding
        self.head = nnx.Linear(s * s * c2, 10, rngs=rngs)
        self.side = side

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = x + nnx.relu(self.bn3(self.conv3(x)))  # residual: conv2 and conv3 outputs couple
        return self.head(x.reshape(x.shape[0], -1))

    def widths(self):
        return self.conv1.out_features, self.conv2.out_features


def fit(model, steps, data, args, desc):
    """``steps`` Adam steps in jitted chunks (NNX's split/merge functional API)."""
    (x, y), _ = data
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    model.train()
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def run(state, idx):
        def step(state, batch):
            m, o = nnx.merge(graphdef, state)
            grads = nnx.grad(lambda m: common.cross_entropy(m(xs[batch]), ys[batch]))(m)
            o.update(m, grads)
            return nnx.state((m, o)), None
        return jax.lax.scan(step, state, idx)[0]

    state = common.train(run, state, steps, batch_size=args.batch, n_train=len(x),
                         chunk=args.chunk, desc=desc)
    nnx.update((model, opt), state)
    model.eval()
    return model


def forward(model):
    """A pure jitted forward ``f(state, x)`` and the model's state."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=250, help="dense training steps")
    p.add_argument("--finetune", type=int, default=100, help="fine-tune steps per shrunk model")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--widths", type=int, nargs=2, default=[16, 32])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    p.add_argument("--out", default="structured_cnn_out", help="directory for the plot")
    args = common.parse_args(p, argv, smoke=dict(steps=2, finetune=2, chunk=2, sparsities=[0.5],
                                                 widths=[4, 8], limit=128, repeats=2, batch=16))
    start = time.perf_counter()
    data = common.images(args.data, args.limit)
    (x, _), (xt, yt) = data
    side = x.shape[1]
    dense = fit(CNN(tuple(args.widths), side, rngs=new_rngs()), args.steps, data, args, "dense")
    x_test = jnp.asarray(xt)
    f, s = forward(dense)
    models = {"dense": dict(model=dense, acc0=common.accuracy(f, s, xt, yt))}
    for sparsity in args.sparsities:
        result = jaxprune.structured.prune_channels(
            dense, jnp.asarray(x[:args.batch]), sparsity=sparsity, importance="l2",
            rebuild=lambda v: CNN((v["conv1"]["kernel"].shape[-1], v["conv2"]["kernel"].shape[-1]),
                                  side, rngs=new_rngs()))
        small = result.model
        small.eval()
        f, s = forward(small)
        acc0 = common.accuracy(f, s, xt, yt)
        models[f"{sparsity:.0%} channels removed"] = dict(
            model=fit(small, args.finetune, data, args, f"fine-tune {sparsity:.0%}"), acc0=acc0)

    for r in models.values():
        r["fn"], r["state"] = forward(r["model"])
    medians, compiled = common.compare_latency(
        {k: (r["fn"], (r["state"], x_test)) for k, r in models.items()}, args.repeats)
    rows, points = [], []
    t_dense = medians["dense"]
    for name, r in models.items():
        params = jaxprune.structured.param_count(nnx.state(r["model"], nnx.Param))
        acc = common.accuracy(compiled[name], r["state"], xt, yt)
        t = medians[name]
        points.append((t_dense / t, acc, name))
        rows.append([name, "/".join(map(str, r["model"].widths())), f"{params:,}",
                     f"{r['acc0']:.4f}", f"{acc:.4f}",
                     common.si(flops(r["fn"], r["state"], x_test[:1])),
                     f"{t * 1e3:.2f} ms", f"{t_dense / t:.2f}x"])
    print(f"\nlatency: forward of {len(xt)} test images, median of {args.repeats} runs "
          f"on {jax.devices()[0].platform}")
    print(common.table(["model", "channels", "params", "acc shrunk", "acc fine-tuned",
                        "FLOPs/img", "latency", "speed-up"], rows))

    figure = common.speedup_plot(points, 'structured channel pruning, NNX CNN', args.out, 'structured_cnn.png')
    print(f"figure: {figure}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
