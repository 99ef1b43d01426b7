"""Gradual group (channel) pruning while training, inside ``jaxprune.prune``.

``prune_groups(groups, sparsity=schedule)`` is an optax transformation (the
last element of a chain, like ``jaxprune.prune``): at each update step of the
schedule every group's channels are scored by the summed magnitude of their
members (L1 filter norms, Li et al. 2017; group coupling as in DepGraph,
Fang et al. 2023), the lowest ``round(s * size)`` channels of each group
(``scope="local"``) or of all groups (``"global"``, mean-normalised scores)
are masked, and pruned channels stay exactly zero. Everything runs under
``jit`` (``lax.cond`` on the step); once training ends, the masks say which
channels ``jaxprune.structured.shrink`` can remove:
``channels_kept(groups, masks)`` turns them into kept indices for a plan.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import scores as score_fns
from jaxprune import threshold
from jaxprune.criteria import criterion
from jaxprune.schedules import SparsitySchedule, as_schedule
from jaxprune.structured.groups import Group
from jaxprune.structured.importance import channel_sums, resolve_path
from jaxprune.transform import MaskRule, prune
from jaxprune.tree import leaves_with_paths

PyTree = Any

__all__ = ["group_rule", "prune_groups", "channels_kept"]


def _members(groups: Sequence[Group], paths: Sequence[str]):
    """[(group index, leaf index, axis, layout array)] with paths resolved."""
    out = []
    for g, group in enumerate(groups):
        for k, (path, axis) in enumerate(group.members):
            leaf = resolve_path(path, paths)
            if leaf is None:
                continue  # a member outside this tree (e.g. batch_stats): not trained here
            layout = (np.asarray(group.layouts[k]) if group.layouts
                      else np.arange(group.size))
            out.append((g, leaf, axis, layout))
    return out


def _channel_scores(groups, members, leaves) -> list[jax.Array]:
    totals = [jnp.zeros(g.size, jnp.float32) for g in groups]
    for g, leaf, axis, layout in members:
        totals[g] = totals[g] + channel_sums(leaves[leaf].astype(jnp.float32), axis, layout,
                                             groups[g].size)
    return totals


def group_rule(groups: Sequence[Group], sparsity: Union[float, SparsitySchedule, Callable],
               *, score: Any = score_fns.magnitude, scope: str = "local",
               every: Optional[int] = None, min_channels: int = 1) -> MaskRule:
    """The ``MaskRule`` of ``prune_groups`` (see the module docstring)."""
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1 (a group cannot lose every channel), "
                         f"got {min_channels}")
    groups = list(groups)
    sched = as_schedule(sparsity, every)

    def update(masks, scores, count, key):
        items = leaves_with_paths(scores)
        paths = [p for p, _ in items]
        leaves = [x for _, x in items]
        members = _members(groups, paths)
        channel = _channel_scores(groups, members, leaves)
        s = sched(count)
        if scope == "local":
            keep = []
            for g, c in zip(groups, channel):
                n = jnp.minimum(threshold.prune_count(s, g.size), g.size - min(min_channels, g.size))
                keep.append(~threshold.lowest([c], n)[0])
        else:
            means = [c / jnp.maximum(jnp.mean(c), 1e-30) for c in channel]
            protected = [~threshold.lowest([c], g.size - min(min_channels, g.size))[0]
                         for c, g in zip(means, groups)]
            total = sum(g.size for g in groups)
            free = total - sum(min(min_channels, g.size) for g in groups)
            n = jnp.minimum(threshold.prune_count(s, total), free)
            keep = [~p for p in threshold.lowest(means, n, protected)]
        full = [None if m is None else jnp.ones(m.shape, bool)
                for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)]
        for g, leaf, axis, layout in members:
            if full[leaf] is None:
                continue
            per_index = jnp.where(jnp.asarray(layout) >= 0,
                                  keep[g][np.maximum(layout, 0)], True)
            shape = [1] * full[leaf].ndim
            shape[axis] = -1
            full[leaf] = full[leaf] & per_index.reshape(shape)
        # A previous mask stays: pruned channels never come back.
        full = [f if m is None else f & m for f, m in zip(
            full, jax.tree.leaves(masks, is_leaf=lambda x: x is None))]
        return jax.tree.unflatten(jax.tree.structure(masks, is_leaf=lambda x: x is None), full)

    return MaskRule(criterion(score), sched.is_update_step, update)


def prune_groups(groups: Sequence[Group], sparsity: Union[float, SparsitySchedule, Callable],
                 *, score: Any = score_fns.magnitude, scope: str = "local",
                 every: Optional[int] = None,
                 min_channels: int = 1) -> optax.GradientTransformationExtraArgs:
    """Gradual channel pruning of coupled groups while training (last in an
    optax chain; see the module docstring).

    Args:
      groups: from ``jaxprune.structured.groups(apply_fn, variables, *inputs)``;
        member paths may carry a collection prefix (``params/...``) that the
        optimized tree lacks.
      sparsity: fraction of channels pruned: a float, a
        ``jaxprune.schedules`` schedule or any optax schedule.
      score: per-weight score summed into channel scores (magnitude: L1).
      scope: "local" (each group loses ``round(s * size)``) or "global".
      every: mask-update period for a float or plain-callable sparsity.
      min_channels: channels every group keeps.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> f = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"]
    >>> v = {"w1": jnp.arange(12.0).reshape(3, 4), "w2": jnp.ones((4, 2))}
    >>> gs = jaxprune.structured.groups(f, v, jnp.ones((1, 3)))
    >>> tx = optax.chain(optax.sgd(0.0), prune_groups(gs, 0.5))
    >>> state = tx.init(v)
    >>> v = optax.apply_updates(v, tx.update(v, state, v)[0])
    >>> v["w1"].tolist()
    [[0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 6.0, 7.0], [0.0, 0.0, 10.0, 11.0]]
    """
    rule = group_rule(groups, sparsity, score=score, scope=scope, every=every,
                      min_channels=min_channels)
    groups = list(groups)

    def where(path: str, leaf: Any) -> bool:
        return any(resolve_path(p, [path]) is not None for g in groups for p, _ in g.members)

    return prune(rule=rule, where=where)


def channels_kept(groups: Sequence[Group], masks: PyTree) -> list[list[int]]:
    """Kept channel indices per group, read off training masks (for
    ``jaxprune.structured.make_plan``): a channel is kept if any of its
    entries in the first member found is kept."""
    items = leaves_with_paths(masks)
    paths = [p for p, _ in items]
    out = []
    for group in groups:
        found = None
        for k, (path, axis) in enumerate(group.members):
            leaf = resolve_path(path, paths)
            if leaf is None:
                continue
            m = np.asarray(items[leaf][1])
            per_index = m.any(axis=tuple(a for a in range(m.ndim) if a != axis))
            layout = np.asarray(group.layouts[k]) if group.layouts else np.arange(group.size)
            keep = np.zeros(group.size, bool)
            keep[layout[layout >= 0]] = per_index[layout >= 0]
            found = keep
            break
        out.append(list(range(group.size)) if found is None else np.flatnonzero(found).tolist())
    return out
