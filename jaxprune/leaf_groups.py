"""Leaves of equal shape handled as one stacked array.

Real models have hundreds of weight leaves but few distinct shapes (a
transformer: q/k/v/o, up, down). Doing per-leaf work once per *group* of
equal leaves -- one stacked ``(leaves, *shape)`` array, processed by a
batched pass or a ``lax.map`` loop -- keeps the traced program (and so the
compile time) independent of the number of leaves. A leaf that arrives
already stacked (scanned layers with a layer axis) joins a group as many
rows: at no copy when it is the group's only member, else concatenated
with the others (a scanned block's q/k/v/o stacks are one group).

In a process with one device, leaves are grouped by *size* and stacked
flattened, ``(leaves, size)``: a Flax attention block's ``(d, heads,
head_dim)`` and ``(heads, head_dim, d)`` kernels, an MLP's ``(d, 4d)`` and
``(4d, d)``, an embedding and an untied head each share one group (every
user of a stack ranks entries by row-major flat index, which flattening
keeps). Each group costs a copy of the selection in the compiled program,
so a 2-layer decoder's seven kernel shapes become three sizes and its
mask update compiles about twice as fast. With several devices a leaf may
be sharded, and flattening a sharded axis would move data between devices,
so leaves are grouped by shape there.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__: list[str] = []

_FLATTEN: Optional[bool] = None  # None: flatten when the process has one device (tests force it)


def flattens() -> bool:
    """Whether stacks hold flattened rows (see the module docstring)."""
    return jax.device_count() == 1 if _FLATTEN is None else _FLATTEN


def _row_shape(x: Any, stacked: bool) -> tuple:
    shape = tuple(jnp.shape(x))[1:] if stacked else tuple(jnp.shape(x))
    if flattens() and not _explicitly_sharded(x):
        return (int(np.prod(shape, dtype=np.int64)),)
    return shape


def _sharding_key(x: Any) -> Any:
    """What sets a leaf's layout: arrays laid out differently are never
    stacked (that would move data between devices)."""
    if isinstance(x, jax.core.Tracer):
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty:
            return None
        return (tuple(mesh.axis_names), tuple(mesh.shape.values()), tuple(sharding.spec))
    sharding = getattr(x, "sharding", None)
    try:
        hash(sharding)
    except TypeError:
        return repr(sharding)
    return sharding


def group_indices(arrays: Sequence[Any], *optional: Sequence[Optional[Any]],
                  rows: Optional[Sequence[bool]] = None) -> list[list[int]]:
    """Indices of ``arrays`` grouped by (row) shape -- size when ``flattens()``
    --, dtype, layout and which ``optional`` companions (e.g. masks) are
    present; groups are listed in order of their first member, members in
    leaf order. With ``rows[i]`` True, array ``i`` is already a stack of rows
    ``(n, *shape)`` and is grouped by its row shape, its rows contiguous in
    the group's stack."""
    groups: dict = {}
    out: list[list[int]] = []
    for i, x in enumerate(arrays):
        stacked = bool(rows and rows[i])
        key = (_row_shape(x, stacked), jnp.dtype(x.dtype), tuple(o[i] is None for o in optional),
               _sharding_key(x))
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(i)
    return out


def _explicitly_sharded(x: Any) -> bool:
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    return bool(mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types))


def stack(arrays: Sequence[Optional[Any]], idx: Sequence[int],
          rows: Optional[Sequence[bool]] = None) -> Optional[jax.Array]:
    """The arrays ``idx`` as one ``(len(idx), *shape)`` array (None if they
    are None; ``(len(idx), size)`` when ``flattens()``); a single array gets
    a free leading axis, an already-stacked one passes through."""
    first = arrays[idx[0]]
    if first is None:
        return None
    stacked = bool(rows and rows[idx[0]])
    row = _row_shape(first, stacked)
    if len(idx) == 1:
        return jnp.asarray(first).reshape(-1, *row)
    if rows and any(rows[i] for i in idx):  # rows of stacked leaves, then of the next leaf
        return jnp.concatenate([jnp.asarray(arrays[i]).reshape(-1, *row) for i in idx])
    first = jnp.asarray(first).reshape(row)
    if _explicitly_sharded(first):  # sharding in types: let jnp.stack spell out the layout
        return jnp.stack([jnp.asarray(arrays[i]) for i in idx])
    at = opaque_indices(len(idx))
    out = jnp.zeros((len(idx), *row), first.dtype)
    for j, i in enumerate(idx):
        out = lax.dynamic_update_index_in_dim(out, jnp.asarray(arrays[i]).reshape(row), at[j], 0)
    return out


def unstack(parts: Sequence[jax.Array], groups: Sequence[Sequence[int]], n: int,
            rows: Optional[Sequence[bool]] = None,
            like: Optional[Sequence[Any]] = None) -> list[jax.Array]:
    """Inverse of ``stack`` over all groups: the list of ``n`` arrays, each
    shaped like ``like[i]`` (needed when ``flattens()``)."""
    if like is None and flattens():
        raise ValueError("unstack needs like= (the stacked rows are flattened)")
    out: list = [None] * n
    shape = (lambda i, got: got) if like is None else (lambda i, got: tuple(jnp.shape(like[i])))
    for part, idx in zip(parts, groups):
        if len(idx) == 1 and rows and rows[idx[0]]:
            out[idx[0]] = part.reshape(shape(idx[0], part.shape))
            continue
        if rows and any(rows[i] for i in idx):
            if like is None:
                raise ValueError("unstack needs like= (stacked leaves share the group)")
            counts = row_counts([like[i] for i in idx], [rows[i] for i in idx])
            starts = opaque_indices(len(idx), np.cumsum([0] + counts[:-1]).tolist())
            for i, at, c in zip(idx, starts, counts):
                out[i] = lax.dynamic_slice_in_dim(part, at, c, 0).reshape(shape(i, None))
            continue
        if len(idx) == 1:
            out[idx[0]] = part[0].reshape(shape(idx[0], part.shape[1:]))
            continue
        at = opaque_indices(len(idx))
        for j, i in enumerate(idx):
            out[i] = lax.dynamic_index_in_dim(part, at[j], 0, keepdims=False).reshape(
                shape(i, part.shape[1:]))
    return out


def opaque_indices(n: int, values: Optional[Sequence[int]] = None) -> tuple:
    """``0, ..., n - 1`` (or ``values``) as scalars XLA cannot see through.
    Slicing row ``j`` of a stack with a constant ``j`` compiles one kernel
    per row (XLA:CPU compiles each for ~0.1 s); with an opaque index the
    kernels are alike and compiled once."""
    values = range(n) if values is None else values
    # Unsigned: jax skips its negative-index fix-up (one scalar kernel per row).
    return lax.optimization_barrier(tuple(jnp.uint32(j) for j in values))


def row_counts(arrays: Sequence[Any], rows: Optional[Sequence[bool]] = None) -> list[int]:
    """How many rows (separate rankings) each array holds."""
    return [int(jnp.shape(x)[0]) if rows and rows[i] else 1 for i, x in enumerate(arrays)]
