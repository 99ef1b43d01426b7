"""jaxprune: pruning for JAX -- masks, optax transformations and structured shrinking.

The pure core maps a parameter pytree to scores, scores to boolean masks, and
masks back onto parameters::

    scores = jaxprune.scores.magnitude(params)
    masks = jaxprune.masks.unstructured(scores, 0.9, scope="global")
    sparse_params = jaxprune.apply_masks(params, masks)
"""

from jaxprune import allocation, masks, scores, threshold, tree
from jaxprune.apply import apply_masks, sparsity
from jaxprune.report import summary

__version__ = "0.1.0"

__all__ = [
    "allocation",
    "apply_masks",
    "masks",
    "scores",
    "sparsity",
    "summary",
    "threshold",
    "tree",
]
