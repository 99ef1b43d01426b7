"""Shrink a Flax Linen MLP for real: same outputs as the masked model, fewer
parameters, a measured speed-up, and a fine-tune that recovers accuracy.

The MLP's widths are hard-coded (``nn.Dense(256)``), as users write them;
jaxprune re-emits the traced jaxpr at the reduced shapes, so nothing in the
module has to change. Importance: L1 norm of each group's weights (Li et al.
2017), widths rounded to multiples of 8.

    python examples/structured_linen_mlp.py [--steps 400] [--sparsity 0.5]
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxprune import structured as st
from jaxprune.report import flops

import common


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=400, help="dense training steps")
    p.add_argument("--finetune", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    args = common.parse_args(p, argv, smoke=dict(steps=2, finetune=2, limit=128, repeats=2))
    start = time.perf_counter()
    (x, y), (xt, yt) = common.flat(common.images(args.data, args.limit))
    model = MLP()
    variables = jax.jit(model.init)(common.key(0), jnp.asarray(x[:2]))

    def fit(apply, params, steps, desc):
        loss = lambda p, aux, xb, yb: (common.cross_entropy(apply({"params": p}, xb), yb), aux)
        run = common.chunk_runner(loss, optax.adam(1e-3), x, y)
        state = (params, None, optax.adam(1e-3).init(params))
        return {"params": common.train(run, state, steps, batch_size=128, n_train=len(x),
                                       chunk=max(steps // 4, 1), desc=desc)[0]}

    dense = fit(model.apply, variables["params"], args.steps, "dense")
    example = jnp.asarray(x[:32])
    for g in st.groups(model.apply, dense, example):
        print(g)
    result = st.prune_channels(model, dense, example, sparsity=args.sparsity, importance="l1",
                               round_to=8)
    masked = model.apply(st.zero_removed(dense, result.plan), jnp.asarray(xt))
    gap = float(jnp.abs(result.module.apply(result.variables, jnp.asarray(xt)) - masked).max())
    print(f"{result}\nplan: {len(json.dumps(result.plan))} bytes of JSON; "
          f"max |shrunk - masked dense| over the test set = {gap:.1e}")
    tuned = fit(result.module.apply, result.variables["params"], args.finetune, "fine-tune")

    x_test = jnp.asarray(xt)
    medians, compiled = common.compare_latency(
        {"dense": (model.apply, (dense, x_test)), "shrunk": (result.apply, (tuned, x_test))},
        args.repeats)
    rows = []
    for name, fn, v, before in [("dense", model.apply, dense, None),
                                (f"{args.sparsity:.0%} units removed", result.apply, tuned,
                                 common.accuracy(result.apply, result.variables, xt, yt))]:
        key = "dense" if before is None else "shrunk"
        rows.append([name, f"{st.param_count(v):,}",
                     "-" if before is None else f"{before:.4f}",
                     f"{common.accuracy(compiled[key], v, xt, yt):.4f}",
                     common.si(flops(fn, v, x_test[:1])), f"{medians[key] * 1e3:.3f} ms",
                     f"{medians['dense'] / medians[key]:.2f}x"])
    print(common.table(["model", "params", "acc before fine-tune", "test acc", "FLOPs/img",
                        f"latency ({len(xt)} images)", "speed-up"], rows))
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
