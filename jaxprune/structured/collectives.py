"""Collectives and ``shard_map`` bodies: coupling rules and shrinking rules.

A collective over *mesh* axes combines the same element across devices, so
each array axis keeps its channel: ``psum``, ``pmax``, ``pmin`` (``pmean`` is
``psum`` then ``div``), ``ppermute``, ``pvary``, ``psum_invariant`` and
``pbroadcast`` couple operand and result axis by axis. ``vmap(...,
axis_name=)`` batches a named collective into positional axes of the same
primitive; those are reduced like ``reduce_sum``. Collectives that move data
between devices along an array axis (``all_gather``, ``all_to_all``,
``reduce_scatter``) freeze that axis; ``axis_index`` has no axes.

``shard_map`` (``jax.pmap`` traces to one as well) couples every unsharded
dimension of an operand or result with the body's and freezes sharded ones: the
body sees them at the per-device size, and pruning them would change their
divisibility by the mesh. The shrunk forward re-emits ``jax.shard_map`` over
the shrunk body with the same mesh and specs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxprune.structured import jaxpr_params as jp

__all__ = ["TRACE_COLLECTIVES", "SHRINK_COLLECTIVES"]


def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _positional(eqn: Any) -> set[int]:
    axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return {a for a in axes if isinstance(a, int)}


def _elementwise_across_devices(t, eqn, scope, sub):
    """Operand k and result k share every axis but positional (reduced) ones."""
    reduced = _positional(eqn)
    for x, out in zip(eqn.invars, eqn.outvars):
        if _is_lit(x):
            continue
        xa = t.axes(x, scope)
        kept = [a for k, a in enumerate(xa) if k not in {r % max(len(xa), 1) for r in reduced}]
        for p, q in zip(kept, t.axes(out, scope)):
            t.uf.union(p, q)


def _move_along(dim_param: str, reason: str):
    """A collective that moves data between devices along one array axis."""
    def rule(t, eqn, scope, sub):
        d = eqn.params[dim_param]
        x, out = eqn.invars[0], eqn.outvars[0]
        xa, oa = t.axes(x, scope), t.axes(out, scope)
        tiled = eqn.params.get("tiled", True)
        if len(xa) == len(oa):  # tiled: the axis changes size in place
            pairs = [(k, k) for k in range(len(xa))]
            moved_in, moved_out = [d], [d]
        elif len(oa) == len(xa) + 1:  # all_gather, not tiled: a new device axis
            pairs = [(k, k if k < d else k + 1) for k in range(len(xa))]
            moved_in, moved_out = [], [d]
        elif len(oa) + 1 == len(xa):  # reduce_scatter, not tiled: the device axis goes
            pairs = [(k if k < d else k + 1, k) for k in range(len(oa))]
            moved_in, moved_out = [d], []
        else:
            raise ValueError(f"'{eqn.primitive.name}' changes rank unexpectedly (tiled={tiled})")
        for i, o in pairs:
            if i in moved_in or o in moved_out:
                continue
            t.uf.union(xa[i], oa[o])
        for i in moved_in:
            t.uf.freeze(xa[i], reason)
        for o in moved_out:
            t.uf.freeze(oa[o], reason)
    return rule


def _all_to_all(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    moved = {eqn.params["split_axis"] % len(xa), eqn.params["concat_axis"] % len(xa)}
    for k, (p, q) in enumerate(zip(xa, oa)):
        if k in moved:
            t.uf.freeze(p, "all_to_all axis"); t.uf.freeze(q, "all_to_all axis")
        else:
            t.uf.union(p, q)


def _shard_map(t, eqn, scope, sub):
    lay = jp.shard_map(eqn)
    body = lay.body.jaxpr
    for v, c in zip(body.constvars, lay.body.consts):
        t.axes(v, sub)
        t.values[(sub, v)] = c

    def couple(outer, inner, spec):
        sharded = jp.spec_dims(spec, len(t.shape(outer)))
        for d, (p, q) in enumerate(zip(t.axes(outer, scope), t.axes(inner, sub))):
            if d in sharded:
                t.uf.freeze(p, "axis sharded by shard_map"); t.uf.freeze(q, "axis sharded by shard_map")
            else:
                t.uf.union(p, q)
        return not sharded

    for outer, inner, spec in zip(eqn.invars, body.invars, lay.in_specs):
        if not _is_lit(outer) and couple(outer, inner, spec):
            t.alias(inner, sub, outer, scope)  # a replicated constant stays known inside
    t.walk(body, sub)
    for outer, inner, spec in zip(eqn.outvars, body.outvars, lay.out_specs):
        if not _is_lit(inner):
            couple(outer, inner, spec)


def _shrink_shard_map(s, eqn, invals, scope, sub):
    lay = jp.shard_map(eqn)
    body = s.sub_eval(lay.body, sub)
    kwargs: dict[str, Any] = dict(mesh=lay.mesh, in_specs=tuple(lay.in_specs),
                                  out_specs=tuple(lay.out_specs), check_vma=lay.check_vma)
    if lay.manual_axes != frozenset(lay.mesh.axis_names):
        kwargs["axis_names"] = set(lay.manual_axes)
    return list(jax.shard_map(lambda *a: tuple(body(*a)), **kwargs)(*invals))


#: Trace rules of collectives (``psum``, ``all_gather``, ...) and of ``shard_map`` bodies.
TRACE_COLLECTIVES: dict[str, Any] = {
    name: _elementwise_across_devices for name in (
        "psum", "pmax", "pmin", "ppermute", "pvary", "psum_invariant", "pbroadcast")}
TRACE_COLLECTIVES.update({
    "all_gather": _move_along("all_gather_dimension", "axis gathered across devices"),
    "all_gather_invariant": _move_along("all_gather_dimension", "axis gathered across devices"),
    "reduce_scatter": _move_along("scatter_dimension", "axis scattered across devices"),
    "all_to_all": _all_to_all,
    "axis_index": lambda t, eqn, scope, sub: None,  # a scalar: no axes
    "shard_map": _shard_map,
})

#: Shrink rules of the same: ``shard_map`` is re-emitted over the shrunk body.
SHRINK_COLLECTIVES: dict[str, Callable] = {"shard_map": _shrink_shard_map}
