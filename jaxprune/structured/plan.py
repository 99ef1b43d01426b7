"""Pruning plans: plain JSON data (group -> kept indices), replayable.

A plan records every group's members, size, layouts (only where a member's
axis is merged: heads x head_dim, concatenations) and kept indices, plus the
shape of every variable leaf, so that it can be replayed on a fresh init of the
same model and checked against a different one (the first mismatching path is
named).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import tree as jtree
from jaxprune.structured.groups import Group
from jaxprune.structured.trace import StructuredPruningError

PyTree = Any
Plan = dict

__all__ = ["make_plan", "check_plan", "plan_groups", "kept_positions", "slice_variables",
           "zero_removed", "group_masks", "describe", "FORMAT", "SEMANTICS", "semantics_of"]

#: Version tag stored in every plan; ``check_plan`` refuses other formats.
FORMAT = "jaxprune.structured.plan/1"
#: What a reduction over a pruned axis computes in the shrunk model (see ``shrink``).
SEMANTICS = ("masked", "native")


def semantics_of(plan: dict, semantics: Optional[str] = None) -> str:
    """``semantics`` if given, else the plan's, else ``"masked"``; checked."""
    got = semantics if semantics is not None else plan.get("semantics", "masked")
    if got not in SEMANTICS:
        raise ValueError(f"semantics={got!r}; expected one of {SEMANTICS}")
    return got


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def make_plan(variables: PyTree, groups: Sequence[Group], kept: Sequence[Sequence[int]],
              semantics: str = "masked") -> Plan:
    """Builds the JSON-serialisable plan ``{format, semantics, leaves, groups}``.

    One entry per group (DepGraph groups, Fang et al. 2023) with its members,
    size, kept indices and, where a member axis is merged, its layout.
    ``semantics`` (``"masked"`` or ``"native"``) is what the shrunk model
    computes over a pruned axis (see ``jaxprune.structured.shrink``).

    >>> from jaxprune.structured.groups import Group
    >>> import numpy as np
    >>> p = make_plan({"w": np.ones((2, 4))}, [Group([("w", 1)], 4, [(0, 1, 2, 3)])], [[1, 3]])
    >>> p["groups"]
    [{'members': [['w', 1]], 'size': 4, 'keep': [1, 3]}]
    """
    out = []
    for g, k in zip(groups, kept):
        entry = g.to_json()
        lay = [None if (len(l) == g.size and list(l) == list(range(g.size))) else list(l)
               for l in g.layouts]
        if any(l is not None for l in lay):
            entry["layouts"] = lay
        entry["keep"] = [int(i) for i in k]
        out.append(entry)
    leaves = {p: [int(n) for n in _shape(x)] for p, x in jtree.leaves_with_paths(variables)}
    return {"format": FORMAT, "semantics": semantics_of({}, semantics), "leaves": leaves,
            "groups": out}


def plan_groups(plan: Plan) -> list[Group]:
    """The groups of a plan, as ``Group`` objects (DepGraph groups, Fang et al. 2023)."""
    out = []
    for e in plan["groups"]:
        lays = e.get("layouts") or [None] * len(e["members"])
        layouts = [tuple(l) if l is not None else tuple(range(e["size"])) for l in lays]
        out.append(Group([(p, int(a)) for p, a in e["members"]], int(e["size"]), layouts))
    return out


def check_plan(plan: Plan, variables: PyTree, groups: Optional[Sequence[Group]] = None) -> None:
    """Raises ``StructuredPruningError`` naming the first path where ``plan``
    does not fit ``variables`` (and, if given, the traced ``groups``).

    Replaying a plan needs the same coupling (Fang et al. 2023, DepGraph);
    shapes are compared first so the message names a leaf, not a group.
    """
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise StructuredPruningError(f"not a jaxprune structured plan (expected format {FORMAT!r})")
    if plan.get("semantics", "masked") not in SEMANTICS:
        raise StructuredPruningError(
            f"plan semantics {plan.get('semantics')!r} is not one of {SEMANTICS}")
    have = {p: list(_shape(x)) for p, x in jtree.leaves_with_paths(variables)}
    want = plan["leaves"]
    for p in list(want) + list(have):
        if p not in have:
            raise StructuredPruningError(f"plan was made for another model: '{p}' is missing from the variables")
        if p not in want:
            raise StructuredPruningError(f"plan was made for another model: '{p}' is not in the plan")
        if have[p] != want[p]:
            raise StructuredPruningError(
                f"plan was made for another model: '{p}' has shape {tuple(have[p])}, "
                f"the plan expects {tuple(want[p])}")
    if groups is None:
        return
    pg = plan["groups"]
    for k, g in enumerate(groups):
        if k >= len(pg):
            raise StructuredPruningError(
                f"plan was made for another model: group of '{g.members[0][0]}' is not in the plan")
        e = pg[k]
        mine = [tuple(m) for m in g.members]
        theirs = [(p, int(a)) for p, a in e["members"]]
        if mine != theirs or g.size != e["size"]:
            first = next((a for a, b in zip(mine, theirs) if a != b), (mine + theirs)[0])
            raise StructuredPruningError(
                f"plan was made for another model: group {k} differs at '{first[0]}' axis {first[1]}")
    if len(pg) != len(groups):
        extra = pg[len(groups)]["members"][0]
        raise StructuredPruningError(
            f"plan was made for another model: its group of '{extra[0]}' is not coupled here")
    for e in pg:
        keep = e["keep"]
        if keep and (min(keep) < 0 or max(keep) >= e["size"]) or sorted(set(keep)) != list(keep):
            raise StructuredPruningError(
                f"plan keeps invalid indices for the group of '{e['members'][0][0]}'")


def kept_positions(plan: Plan) -> dict[tuple[str, int], np.ndarray]:
    """``{(path, axis): kept positions}`` for every pruned leaf axis (Li et al.
    2017 filter pruning extended to DepGraph groups, Fang et al. 2023).

    A position survives iff every group covering it keeps the position's
    channel (positions outside a group's part of the axis are not its concern).
    """
    alive: dict[tuple[str, int], np.ndarray] = {}
    for g, e in zip(plan_groups(plan), plan["groups"]):
        if len(e["keep"]) == g.size:
            continue
        keep = np.zeros(g.size, bool)
        keep[np.asarray(e["keep"], np.int64)] = True
        for (path, axis), lay in zip(g.members, g.layouts):
            lab = np.asarray(lay)
            ok = np.where(lab >= 0, keep[np.maximum(lab, 0)], True)
            key = (path, axis)
            alive[key] = alive[key] & ok if key in alive else ok
    return {k: np.nonzero(v)[0] for k, v in alive.items()}


def _map_leaves(variables: PyTree, fn) -> PyTree:
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    return jax.tree.unflatten(treedef, [fn(jtree.path_str(p), x) for p, x in flat])


def _on_host(x: Any) -> Any:
    """A concrete one-device array as NumPy (no kernel compiled per shape)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) \
            and len(x.sharding.device_set) == 1 and x.dtype != jax.dtypes.float0 \
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(x)
    return x


def slice_variables(variables: PyTree, plan: Plan) -> PyTree:
    """The smaller variables: every pruned axis cut to its kept indices.

    Filter/channel removal (Li et al. 2017) applied to every coupled member
    (Fang et al. 2023); no tracing needed, only the plan.
    """
    pos = kept_positions(plan)

    def cut(path, x):
        mine = [(axis, idx) for (p, axis), idx in pos.items() if p == path]
        if not mine:
            return x
        host = _on_host(x)
        for axis, idx in mine:
            host = np.take(host, idx, axis=axis) if isinstance(host, np.ndarray) \
                else jnp.take(host, jnp.asarray(idx), axis=axis)
        return jax.device_put(host) if isinstance(host, np.ndarray) else host
    return _map_leaves(variables, cut)


def group_masks(variables: PyTree, plan_or_groups: Any,
                kept: Optional[Sequence[Sequence[int]]] = None) -> PyTree:
    """Full-shape boolean masks (``None`` for untouched leaves) of the kept slices.

    Structured (channel) masks for gradual group pruning (Fang et al. 2023;
    Wen et al. 2016): feed them to a masked optimizer so a model trains
    towards the structure it will be shrunk to. ``plan_or_groups`` is a plan
    or a list of ``Group`` objects together with ``kept`` (indices per group).
    """
    plan = plan_or_groups
    if not isinstance(plan, dict):
        if kept is None:
            raise ValueError("group_masks(variables, groups, kept=...) needs kept indices per group")
        plan = make_plan(variables, plan_or_groups, kept)
    pos = kept_positions(plan)

    def mask(path, x):
        m = None
        for (p, axis), idx in pos.items():
            if p == path:
                part = np.broadcast_to(_kept_along(x, axis, idx), np.shape(x))
                m = part if m is None else (m & part)
        return None if m is None else jnp.asarray(m)
    return _map_leaves(variables, mask)


def _kept_along(x: Any, axis: int, idx: Sequence[int]) -> np.ndarray:
    """A bool array broadcastable to ``x``: True at the kept ``idx`` of ``axis``."""
    keep = np.zeros(np.shape(x)[axis], bool)
    keep[idx] = True
    shape = [1] * np.ndim(x)
    shape[axis] = -1
    return keep.reshape(shape)


def zero_removed(variables: PyTree, plan: Plan) -> PyTree:
    """Full-shape variables with every removed slice set to zero.

    The masked dense model that the shrunk model must reproduce (Li et al.
    2017 filter pruning, with DepGraph coupling, Fang et al. 2023).
    """
    check_plan(plan, variables)
    pos = kept_positions(plan)

    def zero(path, x):
        mine = [(axis, idx) for (p, axis), idx in pos.items() if p == path]
        if not mine:
            return x
        host = _on_host(x)
        for axis, idx in mine:
            if isinstance(host, np.ndarray):
                host = np.where(_kept_along(host, axis, idx), host, np.zeros_like(host))
            else:
                host = jnp.where(jnp.asarray(_kept_along(host, axis, idx)), host,
                                 jnp.zeros_like(host))
        return jax.device_put(host) if isinstance(host, np.ndarray) else host
    return _map_leaves(variables, zero)



def describe(plan: Plan) -> str:
    """A readable table of a plan: each group's width before -> after, what
    every pruned leaf axis loses (an axis that is a product of groups, such as
    grouped-query heads or GroupNorm channels, shows its factors), the
    semantics and the parameter count before -> after (as Torch-Pruning
    prints its groups; DepGraph, Fang et al. 2023).

    >>> import numpy as np
    >>> from jaxprune.structured.groups import Group
    >>> p = make_plan({"w": np.ones((2, 4))}, [Group([("w", 1)], 4, [(0, 1, 2, 3)])], [[1, 3]])
    >>> print(describe(p))
    group 0: 4 -> 2  w axis 1
    w axis 1: 4 -> 2 (-50%)
    semantics: masked
    variables: 8 -> 4 scalars
    """
    lines = []
    for k, e in enumerate(plan["groups"]):
        (path, axis), more = e["members"][0], len(e["members"]) - 1
        extra = f" (+{more} more)" if more else ""
        lines.append(f"group {k}: {e['size']} -> {len(e['keep'])}  {path} axis {axis}{extra}")
    pos = kept_positions(plan)
    covering: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for k, g in enumerate(plan_groups(plan)):
        for member, lay in zip(g.members, g.layouts):
            covering.setdefault(tuple(member), []).append((k, np.asarray(lay)))
    for (path, axis), idx in pos.items():
        n = plan["leaves"][path][axis]
        line = f"{path} axis {axis}: {n} -> {len(idx)} (-{100 * (1 - len(idx) / n):.0f}%)"
        groups_here = covering.get((path, axis), [])
        if len(groups_here) > 1:
            product = all((lab >= 0).all() for _, lab in groups_here)
            parts = [f"group {k} ({plan['groups'][k]['size']} -> {len(plan['groups'][k]['keep'])})"
                     for k, _ in groups_here]
            line += " = " + (" x " if product else " + ").join(parts)
        lines.append(line)
    lines.append(f"semantics: {plan.get('semantics', 'masked')}")
    before = after = 0
    for path, shape in plan["leaves"].items():
        new = list(shape)
        for axis in range(len(shape)):
            if (path, axis) in pos:
                new[axis] = len(pos[(path, axis)])
        before += int(np.prod(shape))
        after += int(np.prod(new))
    lines.append(f"variables: {before} -> {after} scalars")
    return "\n".join(lines)
