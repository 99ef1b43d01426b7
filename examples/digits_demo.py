"""Main demo: prune an MLP trained on scikit-learn's bundled digits.

Trains a dense 64-256-256-10 MLP, then for several sparsities builds one global
magnitude mask (exact count, no sort), fine-tunes briefly with the mask held
fixed, and prints test accuracy and the sparse size of the model.

    python examples/digits_demo.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_load
    data = sk_load()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def init_mlp(key, sizes=(64, 256, 256, 10)):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a),
                                "bias": jnp.zeros(b)}
    return params


def forward(params, x):
    n = len(params)
    for i in range(n):
        layer = params[f"Dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(forward(params, x), -1) == y))


def train(params, data, steps, masks=None, lr=1e-3, seed=0):
    (x, y) = data
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if masks is not None:
            params = jaxprune.apply_masks(params, masks)
        return params, opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        params, opt_state = step(params, opt_state, x[idx], y[idx])
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--finetune", type=int, default=300)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train_set, test_set = load_digits()
    dense = train(init_mlp(jax.random.key(0)), train_set, args.steps)
    print(f"dense     test accuracy {accuracy(dense, *test_set):.4f}")
    for s in (0.5, 0.8, 0.9, 0.95, 0.98):
        masks = jaxprune.masks.unstructured(jaxprune.scores.magnitude(dense), s,
                                            scope="global", min_density=0.01)
        pruned = jaxprune.apply_masks(dense, masks)
        one_shot = accuracy(pruned, *test_set)
        tuned = train(pruned, train_set, args.finetune, masks=masks)
        print(f"sparsity {float(jaxprune.sparsity(masks)):.2f}  one-shot {one_shot:.4f}  "
              f"fine-tuned {accuracy(tuned, *test_set):.4f}  "
              f"size {jaxprune.summary(tuned, masks).sparse_bytes / 1024:.1f} KiB")
    print(jaxprune.summary(tuned, masks))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
