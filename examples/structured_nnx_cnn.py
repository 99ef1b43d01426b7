"""Shrink a Flax NNX CNN with BatchNorm and a residual, then train it with nnx.Optimizer.

Run: python examples/structured_nnx_cnn.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprune import structured as st


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(32, rngs=rngs)
        self.conv2 = nnx.Conv(32, 32, (3, 3), rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = x + nnx.relu(self.conv2(x))  # residual: conv1 and conv2 outputs are one group
        return self.head(x.mean(axis=(1, 2)))


def main():
    model = CNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    model.eval()
    result = st.prune_channels(model, x, sparsity=0.5, importance="bn_scale")
    print(f"params {result.params_before} -> {result.params_after}")
    print(jax.tree.map(jnp.shape, result.variables))

    small = result.model  # an nnx.Module whose nnx.Params have the reduced shapes
    opt = nnx.Optimizer(small, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    for i in range(20):
        value = train_step(small, opt, x, y)
    print("loss after 20 steps:", float(value))


if __name__ == "__main__":
    main()
