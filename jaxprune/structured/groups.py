"""Groups of coupled axes: what must lose the same indices together.

``groups(apply_fn, variables, *example_args)`` traces ``apply_fn`` to a jaxpr
(abstract values only; nothing is computed), couples axes with the primitive
rules in ``rules.py`` and returns one ``Group`` per prunable atom: the
dependency groups of DepGraph (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning", CVPR), found from the jaxpr instead of autograd hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxprune import tree as jtree
from jaxprune.structured import equivariance
from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.rules import TRACE_RULES
from jaxprune.structured.trace import StructuredPruningError, Tracer, unsupported_error

PyTree = Any

__all__ = ["Group", "Analysis", "groups", "analyze"]


@dataclasses.dataclass(frozen=True)
class Group:
    """A set of ``(leaf path, axis)`` members that share one channel index
    (a dependency group of DepGraph, Fang et al. 2023).

    ``size`` is the number of channels. When a member's axis is a merged axis
    (heads x head_dim, a concatenation of branches) only part of it belongs to
    this group; ``layouts[k]`` maps each index of member ``k``'s axis to its
    channel of this group (``-1``: not in this group).
    """

    members: list[tuple[str, int]]
    size: int
    layouts: list[tuple[int, ...]] = dataclasses.field(repr=False, compare=False, default_factory=list)

    def __str__(self) -> str:
        lines = [f"Group(size={self.size}, {len(self.members)} members)"]
        for k, (path, axis) in enumerate(self.members):
            note = ""
            if self.layouts and len(self.layouts[k]) != self.size:
                note = f"  (part of an axis of length {len(self.layouts[k])})"
            lines.append(f"  {path}  axis {axis}{note}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"members": [[p, int(a)] for p, a in self.members], "size": int(self.size)}


@dataclasses.dataclass
class Analysis:
    """Everything learnt from one trace (internal; ``groups`` returns ``.groups``)."""

    closed_jaxpr: Any
    tracer: Tracer
    leaf_paths: list[str]
    leaf_shapes: list[tuple]
    var_treedef: Any
    out_treedef: Any
    atoms: list[int]
    groups: list[Group]
    frozen: dict[int, str]

    def leaf_axis_nodes(self, k: int) -> list[int]:
        return self.tracer.axes(jp.sub(self.closed_jaxpr).jaxpr.invars[k], ())


def _trace(apply_fn: Callable, variables: PyTree, args: tuple) -> tuple:
    def flat_fn(var_leaves, arg_leaves):
        v = jax.tree.unflatten(var_def, var_leaves)
        a = jax.tree.unflatten(arg_def, arg_leaves)
        return apply_fn(v, *a)

    var_leaves, var_def = jax.tree.flatten(variables)
    arg_leaves, arg_def = jax.tree.flatten(args)
    def abstract(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    try:
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
            [abstract(x) for x in var_leaves], [abstract(x) for x in arg_leaves])
    except Exception as e:  # flax raises its own error types for shape mismatches
        shapes = [tuple(np.shape(x)) for x in arg_leaves]
        raise StructuredPruningError(
            f"apply_fn(variables, *example_args) failed to trace with example inputs of "
            f"shapes {shapes}: {type(e).__name__}: {e}") from e
    return closed, out_shape, var_def


def analyze(apply_fn: Callable, variables: PyTree, *example_args: Any,
            prunable_io: bool = False) -> Analysis:
    """Traces ``apply_fn(variables, *example_args)`` and couples every axis
    (DepGraph, Fang et al. 2023, on jaxpr equations).

    Output leaves whose path ends with a variable's path and that have its
    shape (the ``(out, updated_state)`` convention of Linen's ``mutable=``) are
    that variable's new value, not a model output: they are coupled to it.
    """
    closed, out_shape, var_def = _trace(apply_fn, variables, example_args)
    items = jtree.leaves_with_paths(variables)
    paths = [p for p, _ in items]
    shapes = [tuple(getattr(x, "shape", np.shape(x))) for _, x in items]
    t = Tracer(TRACE_RULES, fallback=equivariance.couple)
    jaxpr, consts = jp.sub(closed)
    for v, c in zip(jaxpr.constvars, consts):
        t.axes(v, ())
        t.values[((), v)] = c
    n_var = len(paths)
    if not prunable_io:
        for v in jaxpr.invars[n_var:]:
            t.freeze_var(v, (), "model input")
    t.walk(jaxpr, ())
    _freeze_unread(t, jaxpr, n_var)
    out_items = jtree.leaves_with_paths(out_shape)
    for (opath, oleaf), ov in zip(out_items, jaxpr.outvars):
        if type(ov).__name__ == "Literal":
            continue
        state_k = _state_match(opath, tuple(np.shape(oleaf)), paths, shapes)
        if state_k is not None:
            t.unite_vars(ov, (), jaxpr.invars[state_k], ())
        elif not prunable_io:
            t.freeze_var(ov, (), "model output")
    _freeze_dropped(t)
    frozen = t.uf.frozen_atoms()
    # atom -> the leaf axes it appears in, in leaf order (first appearance fixes
    # the group order, so a plan replays on a fresh trace of the same model).
    where: dict[int, list[tuple[int, int]]] = {}
    for k in range(n_var):
        for axis, node in enumerate(t.axes(jaxpr.invars[k], ())):
            found_here = t.uf.atoms(node)
            for atom in dict.fromkeys(found_here):
                where.setdefault(atom, []).append((k, axis))
                if found_here.count(atom) > 1:  # e.g. (n*n) split into (n, n): refuse
                    frozen.setdefault(atom, "channel appears twice within one axis")
    # An axis that an op could not follow may stay only if nothing prunes it.
    for name, text, nodes, why in t.unknown:
        for a in (a for n in nodes for a in t.uf.atoms(n)):
            if a in where and t.uf.size[a] > 1 and a not in frozen:
                raise unsupported_error(name, text, why)
    for name, text, nodes, why in t.unknown:
        for a in (a for n in nodes for a in t.uf.atoms(n)):
            frozen.setdefault(a, f"unsupported primitive '{name}'")
    atoms = [a for a in where if a not in frozen and t.uf.size[a] > 1]
    found = [_group_of(t, jaxpr, atom, paths, where[atom]) for atom in atoms]
    return Analysis(closed, t, paths, shapes, var_def, jax.tree.structure(out_shape),
                    atoms, found, frozen)


def _freeze_unread(t: Tracer, jaxpr: Any, n_var: int) -> None:
    """A variable that no equation reads is not part of the function: its axes
    are not offered as groups (passing it through to the outputs is no read)."""
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    for v in jaxpr.invars[:n_var]:
        if id(v) not in read:
            t.freeze_var(v, (), "variable never read by the traced function")


def _freeze_dropped(t: Tracer) -> None:
    """Positions that a slice leaves out and no variable holds on its own (rows
    of a position table beyond the traced length, channels cut away) are not
    channels: freeze them."""
    uf = t.uf
    held = {uf.find(n) for nodes in t.nodes.values() for n in nodes}
    for n in uf.dropped:
        r = uf.find(n)
        if r not in held and r not in uf.struct:
            uf.freeze(r, "positions a slice leaves out")


def _state_match(opath: str, oshape: tuple, paths: list[str], shapes: list[tuple]) -> Optional[int]:
    for k, (p, s) in enumerate(zip(paths, shapes)):
        if s == oshape and (opath == p or opath.endswith("/" + p)):
            return k
    return None


def _group_of(t: Tracer, jaxpr: Any, atom: int, paths: list[str],
              places: list[tuple[int, int]]) -> Group:
    members, layouts = [], []
    for k, axis in places:
        lab = t.uf.labels(t.axes(jaxpr.invars[k], ())[axis], atom)
        members.append((paths[k], axis))
        layouts.append(tuple(int(x) for x in lab))
    return Group(members, int(t.uf.size[atom]), layouts)


def groups(apply_fn: Callable, variables: PyTree, *example_args: Any,
           prunable_io: bool = False) -> list[Group]:
    """The groups of coupled axes of ``apply_fn(variables, *example_args)``.

    Follows DepGraph (Fang et al. 2023, CVPR): every ``(leaf path, axis)`` in a
    group must lose the same indices. Coupling is found by walking the jaxpr
    (abstract inputs only) with one rule per primitive; an unknown primitive
    touching a non-trivial axis raises ``StructuredPruningError`` naming it.
    Axes that reach the example inputs or the outputs are not prunable unless
    ``prunable_io=True``; neither are axes indexed by position (positions a
    slice leaves out, axes read at data-dependent positions, ``argmax``
    positions) nor leaves the function never reads. A primitive without a rule
    is coupled along the axes where slicing commutes with it exactly
    (``equivariance.py``). Every variable collection is covered.

    Args:
      apply_fn: ``apply_fn(variables, *example_args)``, any JAX function.
      variables: the variables pytree (arrays or ``ShapeDtypeStruct`` leaves).
      *example_args: example inputs (only shapes and dtypes are used).
      prunable_io: also offer axes that reach the inputs or outputs.

    Returns:
      ``list[Group]``; ``print(group)`` lists its members.

    >>> import jax.numpy as jnp
    >>> f = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"]
    >>> v = {"w1": jnp.ones((3, 8)), "w2": jnp.ones((8, 2))}
    >>> [g.members for g in groups(f, v, jnp.ones((1, 3)))]
    [[('w1', 1), ('w2', 0)]]
    """
    return analyze(apply_fn, variables, *example_args, prunable_io=prunable_io).groups
