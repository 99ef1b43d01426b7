"""Group importance and channel selection.

A group's importance is computed per member leaf (the part of the leaf that
belongs to each channel), aggregated over members and optionally normalised;
channels are then ranked within each group (``scope="local"``) or across
groups (``scope="global"``).
"""

from __future__ import annotations

import math
import re
import warnings
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

__all__ = ["group_importance", "select_channels", "factored_sparsities", "IMPORTANCES"]

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
    if isinstance(x, np.ndarray):  # host data: NumPy, no kernel to compile per shape
        per_index = x.sum(axis=tuple(a for a in range(x.ndim) if a != axis), dtype=np.float64)
        lab = np.asarray(layout)
        return np.bincount(lab[lab >= 0], per_index[lab >= 0], minlength=size)
    return np.asarray(channel_sums(x, axis, layout, size), np.float64)


def on_host(x: Any) -> Any:
    """``x`` as a NumPy array if it is a concrete array on one device (cheap to
    read), else ``x`` itself (traced, or sharded: reduce where it lives)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) \
            and len(x.sharding.device_set) == 1:
        return np.asarray(x)
    return x


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
        x = on_host(leaves[path])
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        if kind in ("taylor", "saliency") and path not in gleaves:
            continue  # grads often cover only the params collection
        xp = np if isinstance(x, np.ndarray) else jnp
        x = x.astype(xp.float32)
        if kind == "l1":
            per.append(_per_channel(xp.abs(x), axis, g.layouts[k], g.size))
        elif kind == "l2":
            per.append(np.sqrt(_per_channel(x * x, axis, g.layouts[k], g.size)))
        else:
            gx = on_host(gleaves[path])
            gx = gx.astype(xp.float32) if type(gx) is type(x) else jnp.asarray(gx, jnp.float32)
            prod = x * gx
            if kind == "saliency":
                per.append(_per_channel(abs(prod), axis, g.layouts[k], g.size))
            else:
                per.append(_per_channel(prod, axis, g.layouts[k], g.size) ** 2)
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
    if n_keep <= 0 and min_channels is None:
        raise StructuredPruningError(
            f"sparsity={sparsity} would remove every channel of the group of "
            f"'{g.members[0][0]}' axis {g.members[0][1]} (size {size}); lower the sparsity "
            "or pass min_channels= (min_channels=0 allows removing the whole group)")
    n_keep = max(n_keep, min_channels if min_channels is not None else 1)
    if round_to > 1 and n_keep > 0:
        n_keep = min(size, int(math.ceil(n_keep / round_to)) * round_to)
    return min(n_keep, size)


def _leaf_dimensions(groups: Sequence[Group], active: Sequence[bool]) -> list[list[int]]:
    """The prunable dimensions as the user sees them: for every part of every
    leaf axis, the active groups whose channels index it (one group: a plain
    dimension; several: a factored one, outermost group first)."""
    per_axis: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for k, g in enumerate(groups):
        for m, member in enumerate(g.members):
            lab = np.asarray(g.layouts[m]) if g.layouts else np.arange(g.size)
            per_axis.setdefault(tuple(member), []).append((k, lab))
    dims, seen = [], set()
    for labs in per_axis.values():
        n = max(len(lab) for _, lab in labs)
        sets: dict[tuple, list[int]] = {}
        for i in range(n):
            here = tuple(k for k, lab in labs if active[k] and i < len(lab) and lab[i] >= 0)
            if here:
                sets.setdefault(here, []).append(i)
        for here, idx in sets.items():
            def run(k):  # mean run length of a group's labels: outer factors change slowest
                lab = dict(labs)[k][idx]
                return len(lab) / max(1, 1 + int(np.count_nonzero(np.diff(lab))))
            dim = sorted(here, key=lambda k: -run(k))
            if tuple(dim) not in seen:
                seen.add(tuple(dim))
                dims.append(dim)
    return dims


def factored_sparsities(groups: Sequence[Group], sparsity: float,
                        active: Optional[Sequence[bool]] = None) -> list[float]:
    """Per-group sparsities such that every prunable dimension as the user sees
    it (a leaf axis: heads, channels) loses ``sparsity``, also where the axis
    is a product of groups (grouped-query heads = kv heads x queries per kv
    head; GroupNorm channels = groups x channels per group; heads x head_dim
    of a fused projection).

    A group that indexes some dimension alone loses ``sparsity``; in a
    product, the groups not fixed that way share what is left, the outermost
    one taking it all (whole kv heads, whole norm groups, whole heads go; the
    inner factor stays), so ``(1 - s)`` of the product survives instead of
    ``(1 - s)**k`` (DepGraph groups, Fang et al. 2023).

    >>> from jaxprune.structured.groups import Group
    >>> # 4 query heads = 2 kv heads x 2 queries per kv head; k has the 2 kv heads
    >>> kv = Group([("k", 1), ("q", 1)], 2, [(0, 1), (0, 0, 1, 1)])
    >>> rep = Group([("q", 1)], 2, [(0, 1, 0, 1)])
    >>> factored_sparsities([kv, rep], 0.5)  # half the kv heads, so half the query heads
    [0.5, 0.0]
    """
    active = [True] * len(groups) if active is None else list(active)
    keep = 1.0 - sparsity
    frac: dict[int, float] = {}
    dims = _leaf_dimensions(groups, active)
    for dim in dims:
        if len(dim) == 1:
            frac[dim[0]] = keep
    products = [d for d in dims if len(d) > 1]
    while True:
        progress, pending = False, None
        for dim in products:
            unknown = [k for k in dim if k not in frac]
            if not unknown:
                continue
            done = math.prod(frac[k] for k in dim if k in frac)
            rest = 1.0 if done <= 0 else min(1.0, keep / done)
            if len(unknown) == 1:
                frac[unknown[0]] = rest
                progress = True
            elif pending is None:
                pending = (unknown, rest)
        if progress:
            continue
        if pending is None:
            break
        unknown, rest = pending  # the outermost unknown factor takes the reduction
        frac[unknown[0]] = rest
        for k in unknown[1:]:
            frac[k] = 1.0
    return [1.0 - frac.get(k, keep) if a else 0.0 for k, a in enumerate(active)]


def select_channels(groups: Sequence[Group], scores: Sequence[np.ndarray], sparsity: float, *,
                    scope: str = "local", round_to: int = 1, min_channels: Optional[int] = None,
                    ignore: Union[None, str, Callable[[Group], bool], Sequence[Any]] = None
                    ) -> list[np.ndarray]:
    """Kept channel indices (sorted) per group: the highest-scoring ones.

    ``scope="local"`` removes the fraction ``sparsity`` of every prunable
    dimension as the user sees it (``factored_sparsities``: a leaf axis that
    is a product of groups, such as grouped-query heads or GroupNorm
    channels, loses ``sparsity`` in total, not once per factor);
    ``scope="global"`` ranks all channels of all groups together (use a
    ``normalize`` in ``group_importance`` so scales compare), as in global
    filter pruning (Li et al. 2017; Fang et al. 2023), and never removes every
    channel of a group: each group's best channel is protected (a warning
    says when this changes the allocation); ``min_channels=k`` protects ``k``
    per group, ``min_channels=0`` allows removing whole groups (a zero-width
    layer; a residual branch then drops out). Kept counts are rounded up to a
    multiple of ``round_to`` (capped at the group size) and never drop below
    ``min_channels``; in local scope, a group that would lose all channels
    raises unless ``min_channels`` is given. Groups with a member path
    matching an ``ignore`` regex (or for which an ``ignore`` callable
    ``(group) -> bool`` is true) are kept whole.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    ignore = [ignore] if isinstance(ignore, str) or callable(ignore) else list(ignore or [])
    active = [not _ignored(g, ignore) for g in groups]
    if scope == "local":
        per_group = factored_sparsities(groups, sparsity, active)
        targets = [g.size - threshold.prune_count(sg, g.size) if a else g.size
                   for g, sg, a in zip(groups, per_group, active)]
    elif scope == "global":
        targets = _global_targets(groups, scores, sparsity, active, min_channels)
    else:
        raise ValueError(f"scope={scope!r}; expected 'local' or 'global'")
    kept = []
    for g, s, n, a in zip(groups, scores, targets, active):
        n = _n_keep(g.size, n, round_to, min_channels, g, sparsity) if a else g.size
        # Remove the lowest first, earlier index first among ties (as jaxprune.masks does).
        order = np.argsort(np.asarray(s), kind="stable")[g.size - n:]
        kept.append(np.sort(order))
    return kept


def _global_targets(groups, scores, sparsity, active, min_channels) -> list[int]:
    """Kept counts per group after removing the ``threshold.prune_count(s, n)``
    lowest channels of all active groups, each group's ``min_channels`` best
    protected (1 by default: a global threshold must not disconnect a layer)."""
    pool = np.concatenate([s for s, a in zip(scores, active) if a] or [np.zeros(0)])
    owner = np.concatenate([np.full(g.size, k) for k, (g, a) in enumerate(zip(groups, active))
                            if a] or [np.zeros(0, int)])
    n_remove = threshold.prune_count(sparsity, len(pool))
    floor = 1 if min_channels is None else min_channels
    # Exactly n_remove channels, lowest first (ties broken by position), never
    # the `floor` best of a group.
    order = np.argsort(pool, kind="stable")
    rank_in_group = np.zeros(len(pool), int)
    for k in np.unique(owner):
        mine = order[owner[order] == k]
        rank_in_group[mine] = np.arange(len(mine))[::-1]  # 0 = the group's best
    free = order[rank_in_group[order] >= floor]
    removed = np.bincount(owner[free[:n_remove]], minlength=len(groups))
    unguarded = np.bincount(owner[order[:n_remove]], minlength=len(groups))
    if min_channels is None and not np.array_equal(removed, unguarded):
        emptied = [k for k, g in enumerate(groups) if unguarded[k] >= g.size]
        g = groups[emptied[0]] if emptied else groups[0]
        warnings.warn(
            f"global channel selection would have removed every channel of {len(emptied)} "
            f"group(s) (first: '{g.members[0][0]}' axis {g.members[0][1]}); their best channel "
            "is kept and the next-lowest channels elsewhere are removed instead. Pass "
            "min_channels=0 to allow removing whole groups, or min_channels=k to keep k.",
            stacklevel=3)
    return [g.size - int(removed[k]) if a else g.size
            for k, (g, a) in enumerate(zip(groups, active))]
