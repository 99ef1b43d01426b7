"""Save a pruned model for deployment: sparse export vs dense checkpoint, and a
shrunk (structurally pruned) model with its plan.

    python examples/checkpoint_sparse_export.py

Prints the size of the sparse export (kept values + masks at 1 bit per
weight) against the dense orbax checkpoint and against the raw dense bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import checkpoint


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"Dense_0": {"kernel": jax.random.normal(keys[0], (784, 300)), "bias": jnp.zeros(300)},
              "Dense_1": {"kernel": jax.random.normal(keys[1], (300, 100)), "bias": jnp.zeros(100)},
              "Dense_2": {"kernel": jax.random.normal(keys[2], (100, 10)), "bias": jnp.zeros(10)}}
    root = Path(tempfile.mkdtemp())
    for sparsity in (0.5, 0.9, 0.97):
        masks = jaxprune.masks.unstructured(jaxprune.scores.magnitude(params), sparsity,
                                            scope="global")
        sparse = jaxprune.apply_masks(params, masks)
        with checkpoint.manager(root / f"dense_{sparsity}") as mngr:
            checkpoint.save(mngr, 0, sparse)
        export = checkpoint.export_sparse(root / f"sparse_{sparsity}", sparse, masks,
                                          dense_checkpoint=root / f"dense_{sparsity}" / "0")
        back, _ = checkpoint.load_sparse(root / f"sparse_{sparsity}")
        same = all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(sparse))))
        print(f"sparsity {sparsity:.2f}: sparse export {export.sparse_bytes / 1e3:7.1f} kB = "
              f"{export.ratio:.2f} x dense checkpoint ({export.dense_bytes / 1e3:.1f} kB), "
              f"{export.raw_ratio:.2f} x raw dense bytes; round trip exact: {same}")

    # A structurally pruned model: hidden layer cut from 300 to 120 units.
    small = {"Dense_0": {"kernel": params["Dense_0"]["kernel"][:, :120], "bias": jnp.zeros(120)},
             "Dense_1": {"kernel": params["Dense_1"]["kernel"][:120], "bias": jnp.zeros(100)}}
    plan = {"Dense_0/kernel:1 + Dense_1/kernel:0": {"keep": list(range(120)), "original": 300}}
    checkpoint.save_structured(root / "structured", small, plan)
    variables, plan_back = checkpoint.restore_structured(root / "structured")
    print("structured restore:", jax.tree.map(jnp.shape, variables), "plan equal:", plan_back == plan)


if __name__ == "__main__":
    main()
