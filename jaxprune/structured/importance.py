"""Group importance and channel selection.

A group's importance is computed per member leaf (the part of the leaf that
belongs to each channel), aggregated over members and optionally normalised;
channels are then ranked within each group (``scope="local"``) or across
groups (``scope="global"``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import threshold
from jaxprune import tree as jtree
from jaxprune.structured.groups import Group
from jaxprune.structured.trace import StructuredPruningError

PyTree = Any
Importance = Union[str, Callable[[Group, dict[str, Any], Optional[dict[str, Any]]], np.ndarray]]

__all__ = ["group_importance", "select_channels", "IMPORTANCES"]

#: Names of the built-in channel-importance criteria.
IMPORTANCES = ("l1", "l2", "taylor", "saliency", "bn_scale", "random")
_ALIASES = {"magnitude": "l1", "bn": "bn_scale", "slimming": "bn_scale", "snip": "saliency"}
# Running statistics are state, not weights: they do not vote on importance.
STATS = re.compile(r"(^|/)(batch_stats|mean|var)(/|$)")


def resolve_path(member_path: str, leaf_paths: Sequence[str]) -> Optional[int]:
    """Index of the leaf that a group member names: the same path, or the one
    path that it ends with (a ``params`` tree without its collection prefix)."""
    if member_path in leaf_paths:
        return list(leaf_paths).index(member_path)
    hits = [k for k, p in enumerate(leaf_paths) if member_path.endswith("/" + p)]
    return hits[0] if len(hits) == 1 else None


def channel_sums(x: Any, axis: int, layout: Sequence[int], size: int) -> jax.Array:
    """Sums ``x`` over every axis but ``axis`` and folds the result into the
    group's ``size`` channels by ``layout`` (``-1``: not in this group).
    Jit-safe: the reduction runs where ``x`` lives."""
    x = jnp.asarray(x)
    per_index = jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis))
    lab = np.asarray(layout)
    valid = np.flatnonzero(lab >= 0)
    return jnp.zeros(size, per_index.dtype).at[lab[valid]].add(per_index[valid])


def _per_channel(x: Any, axis: int, layout: Sequence[int], size: int) -> np.ndarray:
    return np.asarray(channel_sums(x, axis, layout, size), np.float64)


def group_importance(variables: PyTree, groups: Sequence[Group], importance: Importance = "l2", *,
                     grads: Optional[PyTree] = None, reduce: str = "sum",
                     normalize: Optional[str] = None, seed: int = 0) -> list[np.ndarray]:
    """One importance vector (length ``group.size``) per group.

    Criteria: ``"l1"`` (Li et al. 2017, "Pruning Filters for Efficient
    ConvNets") and ``"l2"`` magnitude of each channel's slice of every member;
    ``"taylor"``: first-order Taylor (Σ w·g)² per member and channel (Molchanov
    et al. 2019, CVPR; needs ``grads``: like ``variables`` or only its
    ``params`` collection);
    ``"saliency"``: Σ|w·g| per channel (Mozer & Smolensky 1989; Lee et al.
    2019, SNIP; needs ``grads``);
    ``"bn_scale"``: ``|γ|`` of the normalisation scales in the group (Liu et al.
    2017, "Network Slimming"; groups without a scale fall back to ``"l1"``);
    ``"random"``; or a callable ``(group, {path: leaf}, {path: grad} | None)``.
    Aliases: ``"magnitude"`` = ``"l1"``, ``"bn"``/``"slimming"`` =
    ``"bn_scale"``, ``"snip"`` = ``"saliency"``.
    Member scores are aggregated over the group (Fang et al. 2023, DepGraph)
    with ``reduce`` in ``sum|mean|max`` and normalised with ``normalize`` in
    ``None|mean|max|sum|lamp`` (LAMP: Lee et al. 2021, score over the sum of
    the scores not smaller than it).
    """
    if isinstance(importance, str):
        importance = _ALIASES.get(importance, importance)
    leaves = {p: x for p, x in jtree.leaves_with_paths(variables)}
    gleaves = None
    if grads is not None:
        gitems = jtree.leaves_with_paths(grads)
        gpaths = [p for p, _ in gitems]
        gleaves = {}
        for path in leaves:
            k = resolve_path(path, gpaths)
            if k is not None:
                gleaves[path] = gitems[k][1]
    if importance in ("taylor", "saliency") and gleaves is None:
        raise ValueError(f"importance={importance!r} needs grads= (a pytree shaped like variables)")
    rng = np.random.default_rng(seed)
    out = []
    for g in groups:
        if callable(importance):
            score = np.asarray(importance(g, leaves, gleaves), np.float64)
        elif importance == "random":
            score = rng.random(g.size)
        else:
            score = _aggregate(g, leaves, gleaves, importance, reduce)
        out.append(_normalize(score, normalize))
    return out


def _aggregate(g: Group, leaves, gleaves, kind: str, reduce: str) -> np.ndarray:
    if kind not in IMPORTANCES:
        raise ValueError(f"importance={kind!r}; expected one of {IMPORTANCES} or a callable")
    members = [(k, p, a) for k, (p, a) in enumerate(g.members) if not STATS.search(p)]
    if kind == "bn_scale":
        scales = [m for m in members if m[1].endswith("scale") and jnp.ndim(leaves[m[1]]) == 1]
        members, kind = (scales, "l1") if scales else (members, "l1")
    per = []
    for k, path, axis in members:
        x = jnp.asarray(leaves[path])
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        if kind in ("taylor", "saliency") and path not in gleaves:
            continue  # grads often cover only the params collection
        x = x.astype(jnp.float32)
        if kind == "l1":
            per.append(_per_channel(jnp.abs(x), axis, g.layouts[k], g.size))
        elif kind == "l2":
            per.append(np.sqrt(_per_channel(x * x, axis, g.layouts[k], g.size)))
        elif kind == "saliency":
            gx = jnp.asarray(gleaves[path], jnp.float32)
            per.append(_per_channel(jnp.abs(x * gx), axis, g.layouts[k], g.size))
        else:
            gx = jnp.asarray(gleaves[path], jnp.float32)
            per.append(_per_channel(x * gx, axis, g.layouts[k], g.size) ** 2)
    if not per:
        return np.zeros(g.size)
    stack = np.stack(per)
    if reduce == "sum":
        return stack.sum(0)
    if reduce == "mean":
        return stack.mean(0)
    if reduce == "max":
        return stack.max(0)
    raise ValueError(f"reduce={reduce!r}; expected 'sum', 'mean' or 'max'")


def _normalize(score: np.ndarray, how: Optional[str]) -> np.ndarray:
    if how is None:
        return score
    if how == "mean":
        return score / max(score.mean(), 1e-12)
    if how == "max":
        return score / max(score.max(), 1e-12)
    if how == "sum":
        return score / max(score.sum(), 1e-12)
    if how == "lamp":
        order = np.argsort(score, kind="stable")
        suffix = np.cumsum(score[order][::-1])[::-1]
        out = np.empty_like(score)
        out[order] = score[order] / np.maximum(suffix, 1e-12)
        return out
    raise ValueError(f"normalize={how!r}; expected None, 'mean', 'max', 'sum' or 'lamp'")


def _ignored(g: Group, ignore: Sequence[Any]) -> bool:
    return any(pat(g) if callable(pat) else any(re.search(pat, p) for p, _ in g.members)
               for pat in ignore)


def _n_keep(size: int, n_keep: int, round_to: int, min_channels: Optional[int], g: Group,
            sparsity: float) -> int:
    if n_keep <= 0 and not min_channels:
        raise StructuredPruningError(
            f"sparsity={sparsity} would remove every channel of the group of "
            f"'{g.members[0][0]}' axis {g.members[0][1]} (size {size}); lower the sparsity "
            "or pass min_channels=")
    n_keep = max(n_keep, min_channels or 0, 1)
    if round_to > 1:
        n_keep = min(size, int(math.ceil(n_keep / round_to)) * round_to)
    return min(n_keep, size)


def select_channels(groups: Sequence[Group], scores: Sequence[np.ndarray], sparsity: float, *,
                    scope: str = "local", round_to: int = 1, min_channels: Optional[int] = None,
                    ignore: Union[None, str, Callable[[Group], bool], Sequence[Any]] = None
                    ) -> list[np.ndarray]:
    """Kept channel indices (sorted) per group: the highest-scoring ones.

    ``scope="local"`` removes ``prune_count(sparsity, size)`` channels of every
    group; ``scope="global"`` ranks all channels of all groups together (use a
    ``normalize`` in ``group_importance`` so scales compare), as in global
    filter pruning (Li et al. 2017; Fang et al. 2023). Kept counts are rounded
    up to a multiple of ``round_to`` (capped at the group size) and never drop
    below ``min_channels``; without ``min_channels`` a group that would lose all
    channels raises. Groups with a member path matching an ``ignore`` regex (or
    for which an ``ignore`` callable ``(group) -> bool`` is true) are kept whole.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    ignore = [ignore] if isinstance(ignore, str) or callable(ignore) else list(ignore or [])
    active = [not _ignored(g, ignore) for g in groups]
    if scope == "local":
        targets = [g.size - threshold.prune_count(sparsity, g.size) if a else g.size
                   for g, a in zip(groups, active)]
    elif scope == "global":
        pool = np.concatenate([s for s, a in zip(scores, active) if a] or [np.zeros(0)])
        owner = np.concatenate([np.full(g.size, k) for k, (g, a) in enumerate(zip(groups, active))
                                if a] or [np.zeros(0, int)])
        n_remove = threshold.prune_count(sparsity, len(pool))
        # Exactly n_remove channels, lowest first (ties broken by position).
        removed = np.bincount(owner[np.argsort(pool, kind="stable")[:n_remove]],
                              minlength=len(groups))
        targets = [g.size - int(removed[k]) if a else g.size
                   for k, (g, a) in enumerate(zip(groups, active))]
    else:
        raise ValueError(f"scope={scope!r}; expected 'local' or 'global'")
    kept = []
    for g, s, n, a in zip(groups, scores, targets, active):
        n = _n_keep(g.size, n, round_to, min_channels, g, sparsity) if a else g.size
        # Remove the lowest first, earlier index first among ties (as jaxprune.masks does).
        order = np.argsort(np.asarray(s), kind="stable")[g.size - n:]
        kept.append(np.sort(order))
    return kept
