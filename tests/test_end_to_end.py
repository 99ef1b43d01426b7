"""User stories end to end, on real data (scikit-learn's bundled digits)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from helpers import mlp_apply, mlp_init


def init(key, sizes=(64, 128, 128, 10)):
    return mlp_init(key, sizes)


forward = mlp_apply


def train(tx, steps, seed=0):
    (x, y), (xt, yt) = jaxprune.data.digits()
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = init(jax.random.key(seed))
    state = tx.init(params)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, xb), yb).mean()

    @jax.jit
    def epoch(params, state, idx):
        def step(carry, i):
            p, s = carry
            g = jax.grad(loss)(p, x[i], y[i])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(step, (params, state), idx)[0]

    idx = np.random.default_rng(seed).integers(0, len(x), (steps, 64))
    params, state = epoch(params, state, idx)
    acc = float(jnp.mean(jnp.argmax(forward(params, xt), -1) == yt))
    return params, state, acc


@pytest.mark.slow
def test_gradual_magnitude_pruning_to_90_percent_keeps_digits_accuracy():
    _, _, dense = train(optax.adam(2e-3), 1200)
    schedule = jaxprune.schedules.polynomial(0.9, begin=100, end=800, every=50)
    params, state, sparse = train(
        optax.chain(optax.adam(2e-3), jaxprune.prune(sparsity=schedule, scope="global")), 1200)
    masks = jaxprune.masks_of(state)
    n = sum(m.size for m in jax.tree.leaves(masks))
    assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == round(0.9 * n)
    kernels = [params[f"Dense_{i}"]["kernel"] for i in range(3)]
    assert sum(int((k == 0).sum()) for k in kernels) == round(0.9 * n)  # pruned are exactly 0
    assert dense > 0.95
    assert sparse >= dense - 0.02, (dense, sparse)
