"""Train towards a structure with group lasso, then shrink with (almost) no loss.

Group lasso (Wen et al. 2016) over the coupled groups drives whole channels to
zero; L2 group importance then removes exactly those, so the shrunk model
computes nearly what the trained dense model computes.

Run: python examples/structured_group_lasso.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxprune import structured as st


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(64)(x)))


def main():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (256, 8))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2  # needs only a few hidden units
    variables = model.init(jax.random.key(1), x)
    found = st.groups(model.apply, variables, x)

    tx = optax.chain(st.group_lasso(found, strength=3e-3), optax.adam(1e-2))
    params = variables["params"]
    state = tx.init(params)
    loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(1500):
        params, state = step(params, state)
    norms = st.group_norms(params, found)[0]
    print(f"loss {float(loss(params)):.4f}; channels with norm < 1e-2: "
          f"{int((norms < 1e-2).sum())} of {norms.size}")

    trained = {"params": params}
    result = st.prune_channels(model, trained, x, sparsity=0.75, importance="l2")
    gap = jnp.abs(result.apply(result.variables, x) - model.apply(trained, x)).max()
    print(f"params {result.params_before} -> {result.params_after}; "
          f"max |shrunk - trained dense| = {float(gap):.2e}")


if __name__ == "__main__":
    main()
