"""jaxprune: pruning for JAX -- masks, optax transformations and structured shrinking.

Three parts, each usable alone:

* the pure core (``scores``, ``masks``, ``apply_masks``, ``sparsity``,
  ``summary``) maps a parameter pytree to scores, scores to boolean masks,
  and masks back onto parameters;
* optax transformations prune while training: ``prune`` (last in a chain) and
  ``pruned`` (around an optimizer) along ``schedules``; sparse training with
  ``rigl``, ``sparse_evolutionary``, ``static_sparse``, ``fixed_masks`` and
  ``ste``; lottery tickets in ``lottery``;
* ``structured`` finds coupled channels and heads from the jaxpr and removes
  them for real.

``checkpoint`` (orbax) and ``distributed`` serve long and sharded runs. ::

    scores = jaxprune.scores.magnitude(params)
    masks = jaxprune.masks.unstructured(scores, 0.9, scope="global")
    sparse_params = jaxprune.apply_masks(params, masks)
"""

from jaxprune import (allocation, criteria, data, distributed, lottery, masks, schedules, scores, sparse_training,
                      structured, threshold, tree)
from jaxprune.apply import apply_masks, sparsity
from jaxprune.report import summary
from jaxprune.sparse_training import (fixed_masks, rigl, sparse_evolutionary, static_sparse, ste,
                                      ste_apply)
from jaxprune.transform import (STATIC_ARGS, MaskRule, PrunedState, PruneState, masks_of, prune, pruned,
                                schedule_rule, sparsity_of)

__version__ = "0.1.0"


def __getattr__(name):
    # orbax is heavy to import (~2 s): load jaxprune.checkpoint on first use.
    if name == "checkpoint":
        import importlib
        return importlib.import_module("jaxprune.checkpoint")
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")

__all__ = [
    "STATIC_ARGS",
    "MaskRule",
    "PruneState",
    "PrunedState",
    "allocation",
    "apply_masks",
    "criteria",
    "checkpoint",
    "data",
    "distributed",
    "fixed_masks",
    "lottery",
    "masks_of",
    "prune",
    "pruned",
    "rigl",
    "schedule_rule",
    "schedules",
    "sparse_evolutionary",
    "sparse_training",
    "sparsity_of",
    "structured",
    "static_sparse",
    "ste",
    "ste_apply",
    "masks",
    "scores",
    "sparsity",
    "summary",
    "threshold",
    "tree",
]
