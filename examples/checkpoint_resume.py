"""Checkpoint a pruning run with orbax and resume it exactly, in a fresh process.

    python examples/checkpoint_resume.py --dir /tmp/ckpt --steps 20 --stop-at 10  # "crashes" at 10
    python examples/checkpoint_resume.py --dir /tmp/ckpt --steps 20 --out end.npz  # resumes, finishes

A tiny MLP is trained with ``jaxprune.pruned(adam, saliency, gradual
schedule)``. The batch of step t is a pure function of t, so a resumed run
sees the same data as an uninterrupted one; the restored params, optimizer
moments, masks, step count, statistics and PRNG key make the rest identical.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from jaxprune import checkpoint

SIZES = (8, 32, 16, 4)


def init_params(seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(SIZES) - 1)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
                           "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))}


def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The batch of a step, derived from the step alone."""
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(42), step))
    return jax.random.normal(kx, (16, SIZES[0])), jax.random.normal(ky, (16, SIZES[-1]))


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    for i in range(len(SIZES) - 1):
        layer = params[f"Dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(SIZES) - 2:
            x = jax.nn.relu(x)
    return jnp.mean((x - y) ** 2)


def optimizer(steps: int) -> optax.GradientTransformation:
    schedule = jaxprune.schedules.polynomial(0.8, begin=0, end=steps - 2, every=2)
    return jaxprune.pruned(optax.adam(1e-2), jaxprune.scores.saliency, schedule)


def train(directory: str, steps: int, stop_at: Optional[int] = None,
          save_every: Optional[int] = None) -> dict[str, Any]:
    """Trains to ``steps`` (or stops after ``stop_at``), saving every
    ``save_every`` steps (default: at ``stop_at``, or half way), resuming
    from the latest checkpoint in ``directory`` if there is one."""
    tx = optimizer(steps)

    @jax.jit
    def step_fn(params, opt_state, t):
        grads = jax.grad(loss_fn)(params, *batch(t))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = init_params()
    opt_state = tx.init(params)
    every = save_every or stop_at or steps // 2
    with checkpoint.manager(directory, max_to_keep=2, save_interval_steps=every) as mngr:
        start = 0
        if mngr.latest_step() is not None:
            target = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
            restored = checkpoint.restore(mngr, target)
            params, opt_state = restored["params"], restored["opt_state"]
            start = mngr.latest_step()
        for t in range(start, steps if stop_at is None else stop_at):
            params, opt_state = step_fn(params, opt_state, jnp.int32(t))
            # Checkpoint "after step t" is stored as step t + 1 (steps done).
            checkpoint.save(mngr, t + 1, {"params": params, "opt_state": opt_state})
        mngr.wait_until_finished()
    return {"params": params, "masks": jaxprune.masks_of(opt_state)}


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {p: np.asarray(x) for p, x in jaxprune.tree.leaves_with_paths(tree)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--out", default=None, help="write final params and masks (.npz)")
    args = parser.parse_args()
    out = train(args.dir, args.steps, args.stop_at)
    print(f"sparsity {float(jaxprune.sparsity(out['masks'])):.3f}")
    if args.out:
        np.savez(args.out, **{f"params/{k}": v for k, v in _flat(out["params"]).items()},
                 **{f"masks/{k}": v for k, v in _flat(out["masks"]).items()})


if __name__ == "__main__":
    main()
