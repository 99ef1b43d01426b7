"""Applying masks to parameters, and measuring sparsity."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.tree import Where, check_same_structure, is_mask_leaf, leaves_with_paths, select

PyTree = Any

__all__ = ["apply_masks", "sparsity"]


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes every entry of ``params`` whose mask is False.

    ``masks`` has the structure of ``params`` with a bool array or ``None``
    (leave as is) at each leaf, as every ``jaxprune.masks`` function returns.
    Structure or shape mismatches raise ``ValueError`` naming the first path.

    >>> import jax.numpy as jnp
    >>> apply_masks({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"].tolist()
    [1.0, 0.0]
    """
    check_same_structure(params, masks, "params", "masks", b_none_ok=True)
    for path, m in leaves_with_paths(masks):
        if not is_mask_leaf(m):
            raise TypeError(f"masks must hold bool arrays or None; '{path}' has "
                            f"{getattr(m, 'dtype', type(m).__name__)}")

    def one(m, p):
        if m is None:
            return p
        return jnp.where(m, p, jnp.zeros((), p.dtype))

    return jax.tree.map(one, masks, params, is_leaf=lambda x: x is None)


def sparsity(tree: PyTree, where: Where = None) -> jax.Array:
    """Fraction of zeros.

    For a mask pytree (bool leaves, ``None`` for unselected) it is the
    fraction of False entries over the bool leaves. For a parameter pytree it
    is the fraction of exact zeros over the leaves chosen by ``where`` (by
    default floating leaves with ``ndim >= 2`` not named ``bias`` or
    ``scale``: see ``jaxprune.tree``). Works under ``jit``.

    >>> import jax.numpy as jnp
    >>> float(sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]])}))
    0.75
    """
    items = leaves_with_paths(tree)
    if items and all(is_mask_leaf(x) for _, x in items):
        chosen = [x for _, x in items]
        zeros = [jnp.sum(~x) for x in chosen]
    else:
        chosen = [x for (_, x), c in zip(items, select(tree, where)) if c]
        zeros = [jnp.sum(x == 0) for x in chosen]
    total = sum(int(jnp.size(x)) for x in chosen)
    if total == 0:
        return jnp.asarray(0.0, jnp.float32)
    # int32 per leaf is safe; sum in float32 so huge models do not overflow.
    return sum(z.astype(jnp.float32) for z in zeros) / jnp.float32(total)
