"""Coupling rules for primitives that read or write at positions: ``gather``,
``scatter`` and ``rev``.

An axis read at data-dependent positions (token ids into an embedding table,
``take_along_axis`` after an ``argsort``) is frozen: its positions are not
channels. An axis read at *constant* positions (``h[:, perm]``,
``x[:, [0, 2]]``, ``jnp.flip``) is recorded as a ``take`` structure of the
output axis, so a pruned channel is removed wherever the positions put it and
the shrinker renumbers the constant positions to the kept channels. Batch axes
of the indices carry their own index into the output (DepGraph's coupling,
Fang et al. 2023, for indexing ops).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TRACE_INDEXING"]


def _gather(t, eqn, scope, sub):
    """Output batch axes carry the indices' batch axes; window axes taken whole
    carry the operand's. An operand axis read at data-dependent positions is
    frozen; read at constant positions it is a ``take`` of the output axis."""
    x, idx = eqn.invars[:2]
    out = eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    xs, xa, oa = t.shape(x), t.axes(x, scope), t.axes(out, scope)
    ia = t.axes(idx, scope)
    sizes = eqn.params["slice_sizes"]
    obatch = tuple(getattr(dn, "operand_batching_dims", ()))
    ibatch = tuple(getattr(dn, "start_indices_batching_dims", ()))
    offset_operand = [d for d in range(len(xs)) if d not in dn.collapsed_slice_dims and d not in obatch]
    for d, o in zip(offset_operand, dn.offset_dims):
        if sizes[d] == xs[d] and d not in dn.start_index_map:
            t.uf.union(xa[d], oa[o])
        else:
            t.uf.freeze(xa[d], "gathered axis"); t.uf.freeze(oa[o], "gathered axis")
    # Indices: every axis but the last (the index vector) is a batch axis, in order.
    batch_out = [k for k in range(len(oa)) if k not in dn.offset_dims]
    if ia:
        for p, k in zip(ia[:-1], batch_out):
            t.uf.union(p, oa[k])
        t.uf.freeze(ia[-1], "index vector")
        for d, b in zip(obatch, ibatch):
            t.uf.union(xa[d], ia[b])
    else:
        for k in batch_out:
            t.uf.freeze(oa[k], "gathered at literal positions")
    take = _constant_take(t, eqn, scope, batch_out)
    for d in set(dn.collapsed_slice_dims) | set(dn.start_index_map):
        if take is not None and d == take[0]:
            t.uf.set_struct(oa[batch_out[0]], "take", [xa[d]], take[1])
        else:
            t.uf.freeze(xa[d], "axis read at data-dependent positions")


def _constant_take(t, eqn, scope, batch_out):
    """``(operand axis, positions)`` when the gather reads one collapsed axis at
    constant, in-range positions with one batch axis (``h[:, perm]``), else None."""
    dn = eqn.params["dimension_numbers"]
    x, idx = eqn.invars[:2]
    if len(dn.start_index_map) != 1 or tuple(getattr(dn, "operand_batching_dims", ())) \
            or len(t.shape(idx)) != 2 or t.shape(idx)[1] != 1 or len(batch_out) != 1:
        return None
    d = dn.start_index_map[0]
    if d not in dn.collapsed_slice_dims or eqn.params["slice_sizes"][d] != 1:
        return None
    values = t.value(idx, scope)
    if values is None or values.dtype.kind not in "iu":
        return None
    values = values.reshape(-1).astype(np.int64)
    if values.size == 0 or values.min() < 0 or values.max() >= t.shape(x)[d]:
        return None
    return d, values


def _scatter(t, eqn, scope, sub):
    """The result is the operand; an update window axis taken whole carries the
    operand's channel, update batch axes the indices'; written axes are frozen."""
    x, idx, upd = eqn.invars[:3]
    out = eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    xs, us = t.shape(x), t.shape(upd)
    xa, ia, ua, oa = (t.axes(v, scope) for v in (x, idx, upd, out))
    obatch = tuple(getattr(dn, "operand_batching_dims", ()))
    ibatch = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
    for p, q in zip(xa, oa):
        t.uf.union(p, q)
    window = [d for d in range(len(xs)) if d not in dn.inserted_window_dims and d not in obatch]
    for d, w in zip(window, dn.update_window_dims):
        if d not in dn.scatter_dims_to_operand_dims and us[w] == xs[d]:
            t.uf.union(xa[d], ua[w])
        else:
            t.uf.freeze(xa[d], "scattered axis"); t.uf.freeze(ua[w], "scattered axis")
    for d in set(dn.inserted_window_dims) | set(dn.scatter_dims_to_operand_dims):
        t.uf.freeze(xa[d], "axis written at indexed positions")
    upd_batch = [k for k in range(len(us)) if k not in dn.update_window_dims]
    if ia:
        for p, k in zip(ia[:-1], upd_batch):
            t.uf.union(p, ua[k])
        t.uf.freeze(ia[-1], "index vector")
        for d, b in zip(obatch, ibatch):
            t.uf.union(xa[d], ia[b])
    else:
        for k in upd_batch:
            t.uf.freeze(ua[k], "scattered at literal positions")


def _rev(t, eqn, scope, sub):
    """A reversed axis takes the input's channels in reverse order."""
    x, out = eqn.invars[0], eqn.outvars[0]
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    dims = {d % len(xa) for d in eqn.params["dimensions"]}
    for k, (p, q) in enumerate(zip(xa, oa)):
        if k in dims:
            t.uf.set_struct(q, "take", [p], range(t.uf.size[p] - 1, -1, -1))
        else:
            t.uf.union(p, q)


#: Trace rules of indexing primitives: ``gather``, every ``scatter`` variant and ``rev``.
TRACE_INDEXING = {"gather": _gather, "rev": _rev}
TRACE_INDEXING.update({name: _scatter for name in (
    "scatter", "scatter-add", "scatter_add", "scatter-sub", "scatter_sub", "scatter-mul",
    "scatter_mul", "scatter-min", "scatter_min", "scatter-max", "scatter_max")})
