"""Save a pruned model for deployment: the sparse export against the dense
checkpoint at several sparsities, and a structurally shrunk model with its plan.

    python examples/checkpoint_sparse_export.py [--sparsities 0.5 0.9 0.97]

For each sparsity, LeNet-300-100's weights are pruned by global magnitude and
written twice: as an ordinary orbax checkpoint (``checkpoint.save``) and with
``checkpoint.export_sparse`` (kept values + masks at 1 bit per weight). Both
are read back and compared with the pruned weights. Then a channel-pruned
model is saved with its plan (``save_structured``) and restored without
knowing its new shapes. Everything is written to a temporary directory that
is removed at the end (``--keep DIR`` keeps the files there instead).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import checkpoint

import common


class MLP(nn.Module):
    hidden: tuple = (300, 100)

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(10)(x)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9, 0.97])
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--keep", default=None, help="write the files here and keep them")
    args = common.parse_args(p, argv, smoke=dict(sparsities=[0.9], hidden=[32]))
    model = MLP(tuple(args.hidden))
    x = jnp.ones((4, 784))
    variables = jax.jit(model.init)(common.key(0), x)
    params = variables["params"]
    root = args.keep or tempfile.mkdtemp(prefix="jaxprune_export_")
    os.makedirs(root, exist_ok=True)
    try:
        raw = sum(np.asarray(w).nbytes for w in jax.tree.leaves(params))
        rows = []
        for sparsity in args.sparsities:
            masks = jaxprune.masks.unstructured(jaxprune.scores.magnitude(params), sparsity,
                                                scope="global")
            sparse = jaxprune.apply_masks(params, masks)
            dense_dir = os.path.join(root, f"dense_{sparsity}")
            with checkpoint.manager(dense_dir) as mngr:
                checkpoint.save(mngr, 0, sparse)
            with checkpoint.manager(dense_dir) as mngr:
                dense_back = checkpoint.restore(mngr, jax.eval_shape(lambda: sparse))
            export = checkpoint.export_sparse(os.path.join(root, f"sparse_{sparsity}"), sparse,
                                              masks, dense_checkpoint=os.path.join(dense_dir, "0"))
            back, _ = checkpoint.load_sparse(os.path.join(root, f"sparse_{sparsity}"))
            exact = all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(
                jax.tree.leaves(jax.device_get(sparse)), jax.tree.leaves(back),
                jax.tree.leaves(jax.device_get(dense_back))))
            rows.append([f"{sparsity:.0%}", f"{export.dense_bytes / 1024:.1f} KiB",
                         f"{export.sparse_bytes / 1024:.1f} KiB", f"{export.ratio:.2f}x",
                         f"{export.raw_ratio:.2f}x", "yes" if exact else "NO"])
        print(f"LeNet MLP, {raw / 1024:.1f} KiB of raw float32 weights:")
        print(common.table(["sparsity", "dense checkpoint", "sparse export", "export / checkpoint",
                            "export / raw", "both read back exactly"], rows))

        # A structurally pruned model: 60% of the hidden units removed for real.
        result = jaxprune.structured.prune_channels(model, variables, x, sparsity=0.6)
        small_dir = os.path.join(root, "structured")
        checkpoint.save_structured(small_dir, result.variables, result.plan)
        restored, plan = checkpoint.restore_structured(small_dir)  # shapes come from metadata
        again = jaxprune.structured.prune_channels(model, variables, x, plan=plan)  # replay
        same = bool(jnp.array_equal(again.apply(restored, x), result.apply(result.variables, x)))
        print(f"\nstructured: params {result.params_before:,} -> {result.params_after:,}; "
              f"saved {checkpoint.directory_size(small_dir) / 1024:.1f} KiB with its plan; "
              f"restored shapes {[tuple(w.shape) for w in jax.tree.leaves(restored)][:3]}...; "
              f"restored forward identical: {same}")
        if not (same and all(r[-1] == "yes" for r in rows)):
            raise SystemExit("a checkpoint did not read back exactly")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"files kept in {os.path.abspath(root)}")


if __name__ == "__main__":
    main()
