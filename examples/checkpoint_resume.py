"""Checkpoint a pruning run with orbax and resume it exactly, in a fresh process.

    python examples/checkpoint_resume.py            # the whole demonstration, in a temp dir

trains a tiny MLP with ``jaxprune.pruned(adam, saliency, gradual schedule)``
without interruption, trains it again but "crashes" half way, resumes that run
from its checkpoint in a new Python process, and checks that the resumed run
ends bit-identical to the uninterrupted one (params and masks). The batch of
step t is a pure function of t, so a resumed run sees the same data; the
restored params, optimizer moments, masks, step count, statistics and PRNG
key make the rest identical. The steps by hand:

    python examples/checkpoint_resume.py --dir /tmp/ckpt --steps 20 --stop-at 10  # "crashes"
    python examples/checkpoint_resume.py --dir /tmp/ckpt --steps 20 --out end.npz  # resumes
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
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


@functools.lru_cache(maxsize=None)
def training_step(steps: int) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and the jitted step of a ``steps``-long run (compiled once
    per process, however many runs use it)."""
    tx = optimizer(steps)

    @jax.jit
    def step_fn(params, opt_state, t):
        grads = jax.grad(loss_fn)(params, *batch(t))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step_fn


def train(directory: str, steps: int, stop_at: Optional[int] = None,
          save_every: Optional[int] = None) -> dict[str, Any]:
    """Trains to ``steps`` (or stops after ``stop_at``), saving every
    ``save_every`` steps (default: at ``stop_at``, or half way), resuming
    from the latest checkpoint in ``directory`` if there is one."""
    tx, step_fn = training_step(steps)
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


def _save_npz(path: str, out: dict[str, Any]) -> None:
    np.savez(path, **{f"params/{k}": v for k, v in _flat(out["params"]).items()},
             **{f"masks/{k}": v for k, v in _flat(out["masks"]).items()})


def demonstrate(steps: int) -> bool:
    """Uninterrupted run vs a run stopped half way and resumed in a fresh process."""
    root = tempfile.mkdtemp(prefix="jaxprune_resume_")
    try:
        full = train(os.path.join(root, "full"), steps)
        sparsity = float(jaxprune.sparsity(full["masks"]))
        print(f"uninterrupted: {steps} steps, sparsity {sparsity:.3f}")
        train(os.path.join(root, "resumed"), steps, stop_at=steps // 2)
        print(f"second run stopped after step {steps // 2} (checkpoint saved); resuming it in a "
              "new Python process ...")
        end = os.path.join(root, "end.npz")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--dir",
                        os.path.join(root, "resumed"), "--steps", str(steps), "--out", end],
                       check=True)
        resumed, expected = np.load(end), {**{f"params/{k}": v for k, v in
                                              _flat(full["params"]).items()},
                                           **{f"masks/{k}": v for k, v in
                                              _flat(full["masks"]).items()}}
        same = sorted(resumed.files) == sorted(expected) and all(
            np.array_equal(resumed[k], v) and resumed[k].dtype == v.dtype
            for k, v in expected.items())
        worst = max(float(np.max(np.abs(resumed[k].astype(np.float64) - v)))
                    for k, v in expected.items())
        print(f"resumed vs uninterrupted: {len(expected)} arrays, max |difference| {worst}, "
              f"bit-identical: {same}")
        return same
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the demonstration leaves nothing behind


def main(argv: Optional[list] = None) -> None:
    import common  # the examples' shared flags (imported here: tests load this file as a module)

    p = common.parser(__doc__)
    p.add_argument("--dir", default=None,
                   help="checkpoint directory: train to --steps (or stop at --stop-at), "
                        "resuming from the latest checkpoint there; without it, run the "
                        "whole demonstration in a temporary directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--out", default=None, help="with --dir: write final params and masks (.npz)")
    args = common.parse_args(p, argv, smoke=dict(steps=6))
    if args.dir is None:
        if not demonstrate(args.steps):
            sys.exit("the resumed run differs from the uninterrupted one")
        return
    out = train(args.dir, args.steps, args.stop_at)
    print(f"{args.dir}: step {args.stop_at or args.steps}, "
          f"sparsity {float(jaxprune.sparsity(out['masks'])):.3f}")
    if args.out:
        _save_npz(args.out, out)


if __name__ == "__main__":
    main()
