"""Main demo: prune an MLP on scikit-learn's bundled digits, three ways.

1. Dense baseline.
2. Gradual magnitude pruning while training (Zhu & Gupta 2017): one extra
   element in the optax chain, ``jaxprune.prune``, moves a global mask along a
   cubic schedule; pruned weights stay exactly 0.
3. One-shot global magnitude pruning of the trained dense model (exact count,
   no sort), with and without a short fine-tune.

    python examples/digits_demo.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune


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


def train(params, data, steps, tx, seed=0):
    """``steps`` Adam steps in one jitted scan; returns params and opt state."""
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    state = tx.init(params)

    @jax.jit
    def run(params, state, batches):
        def step(carry, idx):
            p, s = carry
            grads = jax.grad(loss_fn)(p, x[idx], y[idx])
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None
        return jax.lax.scan(step, (params, state), batches)[0]

    batches = np.random.default_rng(seed).integers(0, len(x), (steps, 128))
    return run(params, state, batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--finetune", type=int, default=300)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train_set, test_set = jaxprune.data.digits()
    init = init_mlp(jax.random.key(0))
    dense, _ = train(init, train_set, args.steps, optax.adam(1e-3))
    print(f"dense                       test accuracy {accuracy(dense, *test_set):.4f}  "
          f"({jaxprune.summary(dense).dense_bytes / 1024:.0f} KiB)")

    print("\ngradual magnitude pruning during training (optax.chain(adam, jaxprune.prune))")
    for target in (0.8, 0.9, 0.95, 0.98):
        schedule = jaxprune.schedules.polynomial(
            target, begin=args.steps // 10, end=args.steps * 2 // 3, every=50)
        tx = optax.chain(optax.adam(1e-3), jaxprune.prune(
            score=jaxprune.scores.magnitude, sparsity=schedule, scope="global",
            min_density=0.01))
        params, state = train(init, train_set, args.steps, tx)
        masks = jaxprune.masks_of(state)
        print(f"  sparsity {float(jaxprune.sparsity(params)):.3f}  test accuracy "
              f"{accuracy(params, *test_set):.4f}  sparse size "
              f"{jaxprune.summary(params, masks).sparse_bytes / 1024:.1f} KiB")
    sparsest = jaxprune.summary(params, masks)

    print("\none-shot global magnitude pruning of the dense model")
    for s in (0.5, 0.8, 0.9, 0.95):
        masks = jaxprune.masks.unstructured(jaxprune.scores.magnitude(dense), s,
                                            scope="global", min_density=0.01)
        pruned = jaxprune.apply_masks(dense, masks)
        tx = jaxprune.pruned(optax.adam(1e-3), sparsity=s, scope="global", min_density=0.01)
        tuned, _ = train(pruned, train_set, args.finetune, tx)
        print(f"  sparsity {float(jaxprune.sparsity(masks)):.2f}  one-shot "
              f"{accuracy(pruned, *test_set):.4f}  after {args.finetune} fine-tune steps "
              f"{accuracy(tuned, *test_set):.4f}")
    print(f"\nthe {target:.0%}-sparse model, leaf by leaf:")
    print(sparsest)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
