"""Group lasso (L2,1) over coupled channel groups, as an optax transformation."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import tree as jtree
from jaxprune.structured.groups import Group
from jaxprune.structured.importance import STATS, resolve_path
from jaxprune.structured.plan import plan_groups

PyTree = Any

__all__ = ["group_lasso", "group_norms", "GroupLassoState"]


class GroupLassoState(NamedTuple):
    """``group_lasso`` is stateless."""


def _as_groups(groups: Union[dict, Sequence[Group]]) -> list[Group]:
    return plan_groups(groups) if isinstance(groups, dict) else list(groups)


def _plan(groups: list[Group], params: PyTree):
    """Static (leaf index, axis, layout) triples per group, for leaves in ``params``."""
    paths = [p for p, _ in jtree.leaves_with_paths(params)]
    out = []
    for g in groups:
        parts = []
        for (path, axis), lay in zip(g.members, g.layouts):
            k = resolve_path(path, paths)
            if k is not None and not STATS.search(path):
                parts.append((k, axis, np.asarray(lay, np.int32)))
        out.append((g.size, parts))
    return out


def _channel_sq(x: jax.Array, axis: int, layout: np.ndarray, size: int) -> jax.Array:
    rows = jnp.sum(jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1) ** 2, axis=1)
    valid = layout >= 0
    return jax.ops.segment_sum(jnp.where(valid, rows, 0.0), np.where(valid, layout, 0),
                               num_segments=size)


def group_norms(params: PyTree, groups: Union[dict, Sequence[Group]]) -> list[jax.Array]:
    """Per-channel L2 norms of every group (all members' slices of a channel
    together): the terms of the group-lasso penalty (Wen et al. 2016)."""
    leaves = jax.tree.leaves(params)
    out = []
    for size, parts in _plan(_as_groups(groups), params):
        sq = sum((_channel_sq(leaves[k], a, lay, size) for k, a, lay in parts),
                 jnp.zeros((size,)))
        out.append(jnp.sqrt(sq))
    return out


def group_lasso(groups: Union[dict, Sequence[Group]], strength: float,
                eps: float = 1e-8) -> optax.GradientTransformation:
    """Adds ``strength`` times the subgradient of the group-lasso penalty.

    The penalty is Σ_groups Σ_channels ‖W_c‖₂ where ``W_c`` gathers the slices
    of every member of the group that belong to channel ``c`` (Wen et al.
    2016, "Learning Structured Sparsity in Deep Neural Networks"; groups from
    DepGraph, Fang et al. 2023). Its gradient ``w / ‖W_c‖₂`` drives whole
    coupled channels to zero so that they can be shrunk away. Chain it before
    the optimizer: ``optax.chain(group_lasso(groups, 1e-4), optax.adam(1e-3))``.

    Args:
      groups: ``list[Group]`` (from ``groups``) or a plan.
      strength: the penalty weight λ.
      eps: keeps the subgradient finite at ``W_c = 0``.
    """
    groups = _as_groups(groups)

    def init_fn(params: PyTree) -> GroupLassoState:
        del params
        return GroupLassoState()

    def update_fn(updates: PyTree, state: GroupLassoState, params: Optional[PyTree] = None):
        if params is None:
            raise ValueError("group_lasso needs params: call update(grads, state, params)")
        leaves, treedef = jax.tree.flatten(params)
        extra = [jnp.zeros_like(x) for x in leaves]
        for size, parts in _plan(groups, params):
            if not parts:
                continue
            sq = sum(_channel_sq(leaves[k], a, lay, size) for k, a, lay in parts)
            inv = 1.0 / jnp.sqrt(sq + eps)
            for k, a, lay in parts:
                scale = jnp.where(jnp.asarray(lay) >= 0, inv[np.maximum(lay, 0)], 0.0)
                shape = [1] * leaves[k].ndim
                shape[a] = -1
                extra[k] = extra[k] + leaves[k] * scale.reshape(shape)
        reg = jax.tree.unflatten(treedef, extra)
        new = jax.tree.map(lambda u, r: u + strength * r.astype(u.dtype), updates, reg)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)
