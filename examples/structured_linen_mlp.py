"""Shrink a Flax Linen MLP for real, check it against the masked model, fine-tune it.

Run: python examples/structured_linen_mlp.py
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import structured as st


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))  # widths hard-coded, as users write them
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


def main():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (32, 64))
    y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
    variables = model.init(jax.random.key(2), x)

    for g in st.groups(model.apply, variables, x):
        print(g)

    result = st.prune_channels(model, variables, x, sparsity=0.5, importance="l1", round_to=8)
    print(f"params {result.params_before} -> {result.params_after}")
    masked = model.apply(st.zero_removed(variables, result.plan), x)
    print("max |shrunk - masked| =", float(jnp.abs(result.module.apply(result.variables, x) - masked).max()))
    print("plan is JSON:", len(json.dumps(result.plan)), "bytes")

    # Fine-tune the smaller model: its apply is an ordinary differentiable function.
    def loss(v):
        logits = result.module.apply(v, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(1e-3)
    v, state = result.variables, tx.init(result.variables)
    step = jax.jit(lambda v, s: (lambda g: (optax.apply_updates(v, tx.update(g, s, v)[0]),
                                            tx.update(g, s, v)[1]))(jax.grad(loss)(v)))
    first = float(loss(v))
    for _ in range(50):
        v, state = step(v, state)
    print(f"fine-tune loss {first:.3f} -> {float(loss(v)):.3f}")
    assert np.isfinite(float(loss(v)))


if __name__ == "__main__":
    main()
