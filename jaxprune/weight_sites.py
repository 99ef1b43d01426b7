"""Where a jaxpr multiplies a leaf: weight views and matmul/convolution sites.

One-shot pruning (Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023)
needs, for every pruned weight, the inputs that meet it in a matmul. This
module recognises those places in a traced function without any change to
the model:

* a ``View`` follows a leaf through the ops that only re-index it
  (``convert_element_type``, ``transpose``, ``reshape``, ``broadcast_in_dim``,
  ``squeeze``, copies, and the slicing of a stacked leaf by ``scan``): it is
  the leaf's strides, in leaf elements, of the value it became;
* a ``Site`` is a ``dot_general`` or a ``conv_general_dilated`` (through its
  patches view, ``lax.conv_general_dilated_patches``) with a view as one
  operand. It says which leaf axes are contracted (the *input features*,
  raveled in leaf order: the columns of the weight matrix), which have
  statistics of their own (dot batch axes and scanned axes: *groups*), and
  how the other operand's features map onto the columns.

Everything here is static (shapes and strides); ``jaxprune.calibration``
evaluates the sites and ``jaxprune.layer_order`` orders them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["View", "Site", "leaf_view", "propagate", "find_site", "SiteError"]


class SiteError(ValueError):
    """A selected leaf is used in a way one-shot pruning cannot follow."""


@dataclasses.dataclass(frozen=True)
class View:
    """A value that is leaf ``leaf`` re-indexed: element ``i`` of the value is
    element ``sum(i_k * strides[k])`` of the (row-major) leaf, offset along
    the axes sliced by enclosing scans. ``scans`` holds ``(leaf_axis,
    scan_id, index)`` for each such scan (``index`` is None when the body is
    traced once for all iterations)."""

    leaf: int
    leaf_shape: tuple
    shape: tuple
    strides: tuple
    scans: tuple = ()


def leaf_view(k: int, shape: Sequence[int]) -> View:
    """Leaf ``k`` of ``shape`` as itself."""
    shape = tuple(int(n) for n in shape)
    return View(k, shape, shape, _row_major(shape))


def _row_major(shape: Sequence[int]) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _reshape_strides(old: tuple, ostrides: tuple, new: tuple) -> Optional[tuple]:
    """Strides of ``new`` viewing the same elements as (old, ostrides), or None
    when the reshape is not a view (NumPy's no-copy reshape rule)."""
    if math.prod(old) != math.prod(new) or math.prod(old) == 0:
        return None
    od = [(n, s) for n, s in zip(old, ostrides) if n != 1]
    nd = list(new)
    out = [0] * len(nd)
    oi, ni = 0, 0
    while ni < len(nd) and oi < len(od):
        if nd[ni] == 1:
            ni += 1
            continue
        oj, nj, op, np_ = oi + 1, ni + 1, od[oi][0], nd[ni]
        while op != np_:
            if np_ < op:
                np_ *= nd[nj]
                nj += 1
            else:
                op *= od[oj][0]
                oj += 1
        for ok in range(oi, oj - 1):
            if od[ok][1] != od[ok + 1][0] * od[ok + 1][1]:
                return None
        out[nj - 1] = od[oj - 1][1]
        for nk in range(nj - 1, ni, -1):
            out[nk - 1] = out[nk] * nd[nk]
        oi, ni = oj, nj
    return tuple(out)


def _with(view: View, shape, strides) -> Optional[View]:
    if strides is None:
        return None
    return dataclasses.replace(view, shape=tuple(int(n) for n in shape), strides=tuple(strides))


def _transpose(view, p):
    perm = p["permutation"]
    return _with(view, [view.shape[i] for i in perm], [view.strides[i] for i in perm])


def _reshape(view, p):
    if p.get("dimensions") is not None:
        return None
    new = tuple(p["new_sizes"])
    return _with(view, new, _reshape_strides(view.shape, view.strides, new))


def _broadcast(view, p):
    shape, dims = tuple(p["shape"]), p["broadcast_dimensions"]
    strides = [0] * len(shape)
    for i, d in enumerate(dims):
        strides[d] = view.strides[i] if view.shape[i] == shape[d] else 0
    return _with(view, shape, strides)


def _squeeze(view, p):
    drop = {d % len(view.shape) for d in p["dimensions"]}
    keep = [i for i in range(len(view.shape)) if i not in drop]
    return _with(view, [view.shape[i] for i in keep], [view.strides[i] for i in keep])


_SAME = ("convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
         "optimization_barrier", "device_put", "mesh_cast", "reshard", "pvary")
VIEW_RULES = {"transpose": _transpose, "reshape": _reshape, "broadcast_in_dim": _broadcast,
              "squeeze": _squeeze, **{name: None for name in _SAME}}


def propagate(eqn: Any, views: Sequence[Optional[View]]) -> list[Optional[View]]:
    """Views of ``eqn``'s outputs (None where an output is not a re-indexed leaf)."""
    name = eqn.primitive.name
    if name not in VIEW_RULES or not any(v is not None for v in views):
        return [None] * len(eqn.outvars)
    rule = VIEW_RULES[name]
    if rule is None:  # value-preserving, possibly several operands in, as many out
        return [views[i] if i < len(views) else None for i in range(len(eqn.outvars))]
    return [rule(views[0], eqn.params) if views[0] is not None else None]


@dataclasses.dataclass(eq=False)
class Site:
    """A matmul or convolution that multiplies leaf ``leaf``.

    The weight matrix is the leaf with ``group_axes`` first, then the output
    axes, then ``in_axes`` (each in leaf order), reshaped to
    ``(*groups, rows, columns)``. The other operand ("activation") of the op
    gives the statistics: its contracted dimensions ``act_contract`` (paired
    with the weight's, in the op's order; their row-major flat index ``a`` is
    column ``columns[a]``), its batch dimensions paired with weight axes
    (``act_batch``; flat index ``b`` is group ``groups[b]``) or with a
    broadcast weight axis (``act_summed``: summed over), and the rest (rows of
    the activation).
    """

    leaf: int
    kind: str                   # "dot" or "conv"
    operand: int                # which operand of the op is the weight
    in_axes: tuple
    group_axes: tuple           # all leaf axes with statistics of their own, sorted
    scans: tuple                # (leaf_axis, scan_id, index) of the enclosing scans
    act_contract: tuple = ()
    act_batch: tuple = ()
    act_summed: tuple = ()
    columns: Optional[np.ndarray] = None   # None: identity
    groups: Optional[np.ndarray] = None    # None: identity
    conv: Optional[dict] = None            # patches parameters

    @property
    def batch_axes(self) -> tuple:
        """Group axes that are dot batch axes (not scanned)."""
        scanned = {a for a, _, _ in self.scans}
        return tuple(a for a in self.group_axes if a not in scanned)

    def layout(self) -> tuple:
        return (self.in_axes, self.group_axes, tuple(a for a, _, _ in self.scans))


def _touched(size: int, stride: int, leaf_shape: tuple) -> Optional[set]:
    """Leaf axes along which ``size`` steps of ``stride`` move (None: past the end)."""
    if size <= 1 or stride == 0:
        return set()
    steps = np.arange(1, size, dtype=np.int64) * stride
    if stride < 0 or steps[-1] >= math.prod(leaf_shape):
        return None
    coords = np.unravel_index(steps, leaf_shape)
    return {a for a, c in enumerate(coords) if np.any(c)}


def _flat_map(view: View, axes: Sequence[int], onto: Sequence[int], path: str,
              prim: str) -> Optional[np.ndarray]:
    """For the row-major grid over view ``axes``: the row-major index over leaf
    axes ``onto`` of each element; None when that is the identity. Raises
    unless it is a permutation (each leaf index met exactly once)."""
    sizes = [view.shape[a] for a in axes]
    n = math.prod(sizes)
    bad = SiteError(f"leaf '{path}' reaches `{prim}` through a view that does not map its "
                    "input features one to one")
    if n != math.prod(view.leaf_shape[a] for a in onto):
        raise bad
    flat = np.zeros(n, np.int64)
    if axes:
        grids = np.meshgrid(*[np.arange(s, dtype=np.int64) for s in sizes], indexing="ij")
        flat = sum(g.reshape(-1) * view.strides[a] for g, a in zip(grids, axes))
    coords = np.unravel_index(flat, view.leaf_shape)
    onto_sizes = [view.leaf_shape[a] for a in onto]
    idx = np.ravel_multi_index([coords[a] for a in onto], onto_sizes) if onto else np.zeros(n, np.int64)
    if not np.array_equal(np.sort(idx), np.arange(n)):
        raise bad
    return None if np.array_equal(idx, np.arange(n)) else idx


def _roles(view: View, contract: Sequence[int], batch: Sequence[int], path: str,
           prim: str) -> tuple[tuple, tuple, list]:
    """(in_axes, batch leaf axes, view batch axes that are broadcast) of the leaf."""
    role: dict[int, str] = {a: "scan" for a, _, _ in view.scans}
    for j, (n, s) in enumerate(zip(view.shape, view.strides)):
        kind = "in" if j in contract else "batch" if j in batch else "out"
        hit = _touched(n, s, view.leaf_shape)
        if hit is None:
            raise SiteError(f"leaf '{path}' reaches `{prim}` through a view jaxprune cannot map")
        if s == 0 and n > 1 and kind == "in":
            raise SiteError(f"leaf '{path}' is broadcast along a contracted axis of `{prim}`; "
                            "its input features are not the leaf's")
        for a in hit:
            if role.setdefault(a, kind) != kind:
                raise SiteError(
                    f"leaf '{path}' axis {a} is both {role[a]} and {kind} axis of `{prim}` "
                    "(a reshape mixes input and output features); one-shot pruning cannot "
                    "tell its input features")
    for a, n in enumerate(view.leaf_shape):
        if n > 1 and a not in role:
            raise SiteError(f"`{prim}` uses only part of leaf '{path}' (axis {a} is sliced)")
    in_axes = tuple(a for a in range(len(view.leaf_shape)) if role.get(a) == "in")
    batch_axes = tuple(a for a in range(len(view.leaf_shape)) if role.get(a) == "batch")
    summed = [j for j in batch if view.strides[j] == 0 and view.shape[j] > 1]
    return in_axes, batch_axes, summed


def _dot_site(eqn, views, paths) -> Optional[Site]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for w in (1, 0):
        view = views[w]
        if view is None:
            continue
        wc, wb = (rc, rb) if w == 1 else (lc, lb)
        xc, xb = (lc, lb) if w == 1 else (rc, rb)
        path = paths[view.leaf]
        in_axes, batch_axes, summed = _roles(view, wc, wb, path, "dot_general")
        kept_w = [j for j in wb if j not in summed and view.shape[j] > 1]
        columns = _flat_map(view, list(wc), in_axes, path, "dot_general")
        groups = _flat_map(view, kept_w, batch_axes, path, "dot_general")
        pair = dict(zip(wb, xb))
        return Site(view.leaf, "dot", w, in_axes, _sorted_groups(view, batch_axes), view.scans,
                    act_contract=tuple(xc), act_batch=tuple(pair[j] for j in kept_w),
                    act_summed=tuple(pair[j] for j in wb if j not in kept_w),
                    columns=columns, groups=groups)
    return None


def _sorted_groups(view: View, batch_axes) -> tuple:
    return tuple(sorted(set(batch_axes) | {a for a, _, _ in view.scans}))


def _conv_site(eqn, views, paths) -> Optional[Site]:
    view = views[1]
    if view is None:
        if views[0] is not None:
            raise SiteError(f"leaf '{paths[views[0].leaf]}' is the input (lhs) of a convolution; "
                            "only kernels (rhs) can be pruned one-shot")
        return None
    p = eqn.params
    path = paths[view.leaf]
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        raise SiteError(f"leaf '{path}' is the kernel of a grouped convolution "
                        f"(feature_group_count={p.get('feature_group_count')}); one-shot pruning "
                        "supports feature_group_count == batch_group_count == 1")
    dn = p["dimension_numbers"]
    spatial = tuple(dn.rhs_spec[2:])
    if list(spatial) != sorted(spatial):
        raise SiteError(f"leaf '{path}': convolution kernel spatial dimensions {spatial} are not in "
                        "increasing order; patches cannot be matched to it")
    contract = (dn.rhs_spec[1],) + spatial
    in_axes, _, _ = _roles(view, contract, (), path, "conv_general_dilated")
    columns = _flat_map(view, list(contract), in_axes, path, "conv_general_dilated")
    conv = dict(filter_shape=tuple(view.shape[d] for d in spatial), window_strides=p["window_strides"],
                padding=p["padding"], lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                dimension_numbers=dn)
    return Site(view.leaf, "conv", 1, in_axes, _sorted_groups(view, ()), view.scans,
                columns=columns, conv=conv)


def find_site(eqn: Any, views: Sequence[Optional[View]], paths: Sequence[str]) -> Optional[Site]:
    """The site of ``eqn`` if it is a matmul/convolution with a weight view."""
    name = eqn.primitive.name
    if name == "dot_general":
        return _dot_site(eqn, views, paths)
    if name == "conv_general_dilated":
        return _conv_site(eqn, views, paths)
    return None


def slice_view(view: Optional[View], scan_id: Any, index: Optional[int]) -> Optional[View]:
    """The view of one iteration's slice (axis 0) of a scanned array."""
    if view is None:
        return None
    hit = _touched(view.shape[0], view.strides[0], view.leaf_shape)
    if hit is None or len(hit) > 1:
        return None
    if not hit:  # the leaf does not vary along the scan: the same weight each step
        return View(view.leaf, view.leaf_shape, view.shape[1:], view.strides[1:], view.scans)
    (axis,) = hit
    if view.strides[0] != _row_major(view.leaf_shape)[axis] or view.shape[0] != view.leaf_shape[axis]:
        return None
    return View(view.leaf, view.leaf_shape, view.shape[1:], view.strides[1:],
                view.scans + ((axis, scan_id, index),))
