"""Checkpoints with orbax: training state, structured results, sparse exports.

Thin helpers on top of ``orbax.checkpoint`` (``CheckpointManager`` with
``args.Composite(StandardSave, JsonSave)``):

* ``save`` / ``restore``: any pytree of training state -- params, an optax
  state holding a ``PruneState`` (bool masks with ``None`` on unselected
  leaves, step count, criterion statistics, a typed PRNG key). Restoring
  against a target (concrete, or abstract from ``jax.eval_shape``) brings
  NamedTuple / dataclass states back typed and sharded like the target;
  a target that differs from the checkpoint is refused with the first
  mismatching path. Orbax writes each step to a temporary directory and
  renames it when complete, so a crash during a save leaves the earlier
  steps readable and ``restore`` picks the last complete one.
* ``save_structured`` / ``restore_structured``: shrunk variables plus the
  JSON pruning plan; restored without knowing the new shapes.
* ``export_sparse`` / ``load_sparse``: nonzero values plus bit-packed masks
  for deployment, with the size on disk against a dense checkpoint.

Nothing is restored wrong and nothing is half-written: every array is
stored with a checksum (computed on device where its shards live) that
every restore verifies, raising ``CorruptCheckpointError`` with the first
damaged leaf path; a damaged or missing metadata file raises it naming the
file; ``save_structured`` and ``export_sparse`` write under a temporary name
and rename when complete.

Usage (one step of a training loop)::

    mngr = jaxprune.checkpoint.manager("/ckpt", max_to_keep=3)
    jaxprune.checkpoint.save(mngr, step, {"params": params, "opt_state": opt_state})
    target = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
    state = jaxprune.checkpoint.restore(mngr, target)        # latest complete step
"""

from jaxprune.checkpoint._integrity import CorruptCheckpointError
from jaxprune.checkpoint._sparse import SparseExport, directory_size, export_sparse, load_sparse
from jaxprune.checkpoint._state import manager, restore, save, saved_metadata
from jaxprune.checkpoint._structured import restore_structured, save_structured

__all__ = ["manager", "save", "restore", "saved_metadata", "save_structured",
           "restore_structured", "SparseExport", "export_sparse", "load_sparse", "directory_size",
           "CorruptCheckpointError"]
