"""A tiny MLP shared by the tests (plain dict params, Flax-like paths)."""

import jax
import jax.numpy as jnp
import numpy as np


def mlp_init(key, sizes, gain=2.0, dtype=jnp.float32):
    """{"Dense_i": {"kernel", "bias"}} with N(0, gain / fan_in) kernels."""
    if isinstance(key, int):
        key = jax.random.key(key)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {
            "kernel": (jax.random.normal(sub, (a, b)) * np.sqrt(gain / a)).astype(dtype),
            "bias": jnp.zeros(b, dtype)}
    return params


def mlp_apply(params, x, activation=jax.nn.relu):
    n = len(params)
    for i in range(n):
        x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            x = activation(x)
    return x


def linen_mlp(widths):
    """A Flax Linen MLP: Dense layers of ``widths`` with ReLU between them."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, w in enumerate(widths):
                x = nn.Dense(w)(x)
                x = nn.relu(x) if i < len(widths) - 1 else x
            return x

    return MLP()


def train_linen(apply, params, tx, x, y, steps):
    """``steps`` jitted squared-error steps of a Linen ``apply`` with ``tx``
    (which may need params in ``update``); returns (params, opt_state)."""
    import optax

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((apply({"params": p}, x) - y) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state
