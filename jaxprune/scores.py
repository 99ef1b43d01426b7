"""Importance criteria: pure functions from parameters (and gradients) to scores.

Every function returns a pytree shaped like ``params``; larger score means
more important (pruned last). Scores are computed for every array leaf; which
leaves are pruned is decided later by the ``where=`` of a mask function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.tree import check_same_structure

PyTree = Any

__all__ = ["magnitude", "random", "saliency", "taylor", "movement", "fisher"]


def magnitude(params: PyTree) -> PyTree:
    """Weight magnitude ``|w|`` (Han et al. 2015, "Learning both Weights and
    Connections for Efficient Neural Networks").

    >>> import jax.numpy as jnp
    >>> magnitude({"w": jnp.array([-2.0, 1.0])})["w"].tolist()
    [2.0, 1.0]
    """
    return jax.tree.map(jnp.abs, params)


def random(params: PyTree, key: jax.Array) -> PyTree:
    """Uniform random scores in [0, 1), one independent stream per leaf.

    The baseline criterion for random pruning and for static sparse training
    (e.g. the static-sparse baseline of Evci et al. 2020, RigL).
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    by_shape: dict = {}
    for i, x in enumerate(leaves):
        by_shape.setdefault(tuple(jnp.shape(x)), []).append(i)
    out: list = [None] * len(leaves)
    # Leaves of one shape draw through one vmapped generator (the same values
    # as one call per leaf): the program holds a generator per shape, not per leaf.
    for shape, idx in by_shape.items():
        draw = jax.vmap(lambda k: jax.random.uniform(k, shape, dtype=jnp.float32))(
            keys[np.asarray(idx)])
        # Materialised once: XLA would otherwise fuse the generator into every slice.
        draw = lax.optimization_barrier(draw)
        for j, i in enumerate(idx):
            out[i] = draw[j]
    return jax.tree.unflatten(treedef, out)


def _pair(params: PyTree, other: PyTree, other_name: str) -> None:
    check_same_structure(params, other, "params", other_name)


def saliency(params: PyTree, grads: PyTree) -> PyTree:
    """First-order saliency ``|w * g|`` (Mozer & Smolensky 1989; SNIP, Lee et
    al. 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity").

    >>> import jax.numpy as jnp
    >>> saliency({"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([0.5, 3.0])})["w"].tolist()
    [1.0, 3.0]
    """
    _pair(params, grads, "grads")
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


def taylor(params: PyTree, grads: PyTree) -> PyTree:
    """First-order Taylor importance ``(w * g)**2`` per weight (Molchanov et
    al. 2019, "Importance Estimation for Neural Network Pruning", CVPR): the
    squared first-order estimate of the loss change when ``w`` is removed."""
    _pair(params, grads, "grads")
    return jax.tree.map(lambda w, g: jnp.square(w * g), params, grads)


def movement(params: PyTree, grads: PyTree) -> PyTree:
    """Movement score ``-w * g`` (Sanh et al. 2020, "Movement Pruning").

    Weights moving away from zero score high. Accumulate it over steps (sum
    the per-step scores, as ``jaxprune.prune`` does in its state) and keep the
    largest.
    """
    _pair(params, grads, "grads")
    return jax.tree.map(lambda w, g: -(w * g), params, grads)


def fisher(params: PyTree, sq_grads: PyTree) -> PyTree:
    """Diagonal Fisher / Optimal Brain Damage saliency ``0.5 * w**2 * E[g**2]``
    (LeCun et al. 1990, "Optimal Brain Damage"), with the Hessian diagonal
    approximated by the empirical Fisher ``E[g**2]`` (pass the running mean of
    squared gradients as ``sq_grads``)."""
    _pair(params, sq_grads, "sq_grads")
    return jax.tree.map(lambda w, f: 0.5 * jnp.square(w) * f, params, sq_grads)
