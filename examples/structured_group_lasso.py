"""Train towards a structure with group lasso, then shrink with (almost) no loss.

Group lasso (Wen et al. 2016) over the coupled groups drives whole hidden
units to zero; L2 group importance then removes exactly those, so the shrunk
model computes nearly what the trained dense model computes. The baseline is
the same training without the penalty, shrunk the same way: its outputs move
far more.

    python examples/structured_group_lasso.py [--steps 1500] [--sparsity 0.75]
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxprune import structured as st

import common


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(64)(x)))


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--strength", type=float, default=3e-3, help="group lasso weight")
    p.add_argument("--sparsity", type=float, default=0.75, help="fraction of hidden units removed")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    p.add_argument("--latency-batch", type=int, default=65536, help="inputs per timed forward")
    args = common.parse_args(p, argv, smoke=dict(steps=3, repeats=2, latency_batch=256))
    start = time.perf_counter()
    model = MLP()
    x = jax.random.normal(common.key(0), (256, 8))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2  # needs only a few hidden units
    variables = model.init(common.key(1), x)
    x_big = jax.random.normal(common.key(2), (args.latency_batch, 8))
    found = st.groups(model.apply, variables, x)
    loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    def fit(tx):
        @jax.jit
        def run(params, state):
            def step(carry, _):
                p, s = carry
                updates, s = tx.update(jax.grad(loss)(p), s, p)
                return (optax.apply_updates(p, updates), s), None
            return jax.lax.scan(step, (params, state), None, length=args.steps)[0][0]
        return {"params": run(variables["params"], tx.init(variables["params"]))}

    rows = []
    for name, tx in [("plain Adam", optax.adam(1e-2)),
                     ("Adam + group lasso", optax.chain(st.group_lasso(found, args.strength),
                                                        optax.adam(1e-2)))]:
        trained = fit(tx)
        norms = st.group_norms(trained["params"], found)[0]
        result = st.prune_channels(model, trained, x, sparsity=args.sparsity, importance="l2")
        out, small = model.apply(trained, x), result.apply(result.variables, x)
        medians, _ = common.compare_latency(
            {"dense": (model.apply, (trained, x_big)),
             "shrunk": (result.apply, (result.variables, x_big))}, args.repeats)
        rows.append([name, f"{float(loss(trained['params'])):.4f}",
                     f"{int((norms < 1e-2).sum())} / {norms.size}",
                     f"{result.params_before} -> {result.params_after}",
                     f"{float(jnp.abs(small - out).max()):.2e}",
                     f"{float(jnp.mean((small - y) ** 2)):.4f}",
                     f"{medians['dense'] / medians['shrunk']:.2f}x"])
    print(common.table(["training", "loss (dense)", "units with norm < 1e-2", "params",
                        "max |shrunk - dense|", "loss (shrunk)", "speed-up"], rows))
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
