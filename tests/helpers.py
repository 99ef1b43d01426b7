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
