"""Calibration statistics of the inputs that meet each weight, without model changes.

``calibrate(apply_fn, variables, batches)`` traces ``apply_fn(variables,
*batch)`` to a jaxpr, finds every ``dot_general`` and ``conv_general_dilated``
that multiplies a selected leaf (``jaxprune.weight_sites``) and replays the
jaxpr over the calibration batches, accumulating in float32, whatever the
model's dtype, the statistics of the other operand X (rows = tokens, pixels,
examples; columns = the weight's input features):

* ``sq_norm[j] = sum_rows X[:, j]**2``: Wanda's input norms ‖X_j‖² (Sun et al.
  2023, "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv 2306.11695);
* ``gram = XᵀX``: SparseGPT's layer Hessian H = 2XᵀX (Frantar & Alistarh 2023,
  "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
  arXiv 2301.00774), only when asked and only for the selected leaves.

A convolution's X is its patches view (``lax.conv_general_dilated_patches``).
A stacked leaf sliced by ``scan`` gets statistics per slice (a leading layer
axis): scanned transformer layers each have their own.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import tree as jtree
from jaxprune.layer_order import Layers, analyze_layers
from jaxprune.structured import jaxpr_params as jp
from jaxprune.weight_sites import Site, SiteError, find_site, leaf_view, propagate, slice_view

PyTree = Any

__all__ = ["LayerStats", "calibrate", "to_matrix", "from_matrix"]


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Input statistics of one weight leaf (float32).

    The leaf read as a matrix has rows = its output features and columns =
    its input features: the ``in_axes`` raveled in leaf order
    (``to_matrix``). ``group_axes`` (scanned layer axes, dot batch axes) have
    statistics of their own and lead every array.

    Attributes:
      sq_norm: ``(*groups, columns)``: Σ over calibration rows of x_j².
      gram: ``(*groups, columns, columns)``: Σ x xᵀ, or None.
      count: ``(*groups,)``: number of rows accumulated.
      in_axes, group_axes: leaf axes (static).
    """

    sq_norm: jax.Array
    gram: Optional[jax.Array]
    count: jax.Array
    in_axes: tuple = ()
    group_axes: tuple = ()


jax.tree_util.register_dataclass(LayerStats, data_fields=["sq_norm", "gram", "count"],
                                 meta_fields=["in_axes", "group_axes"])


def _matrix_order(ndim: int, in_axes: tuple, group_axes: tuple) -> list[int]:
    out_axes = [a for a in range(ndim) if a not in in_axes and a not in group_axes]
    return list(group_axes) + out_axes + list(in_axes)


def to_matrix(leaf: jax.Array, stats: LayerStats) -> jax.Array:
    """The leaf as ``(*groups, rows, columns)``: group axes, then output axes,
    then input axes (each in leaf order)."""
    order = _matrix_order(leaf.ndim, stats.in_axes, stats.group_axes)
    moved = jnp.transpose(leaf, order)
    g = len(stats.group_axes)
    cols = math.prod(leaf.shape[a] for a in stats.in_axes)
    return moved.reshape(*moved.shape[:g], -1, cols)


def from_matrix(matrix: jax.Array, shape: Sequence[int], stats: LayerStats) -> jax.Array:
    """Inverse of ``to_matrix`` for a leaf of ``shape``."""
    order = _matrix_order(len(shape), stats.in_axes, stats.group_axes)
    moved = matrix.reshape([shape[a] for a in order])
    return jnp.transpose(moved, np.argsort(order))


# ----------------------------------------------------------------- evaluation
def _site_stats(x: jax.Array, site: Site, shape: tuple, gram: bool) -> tuple:
    """(sq_norm, gram, count) of activation ``x`` at ``site``, shaped
    ``(*batch groups in leaf order, columns)`` in leaf column order."""
    x = x.astype(jnp.float32)
    if site.kind == "conv":
        c = site.conv
        x = lax.conv_general_dilated_patches(
            x, c["filter_shape"], c["window_strides"], c["padding"], c["lhs_dilation"],
            c["rhs_dilation"], c["dimension_numbers"], precision=lax.Precision.HIGHEST)
        out = c["dimension_numbers"].out_spec
        x = jnp.transpose(x, (out[0], *out[2:], out[1]))
        x = x.reshape(1, -1, x.shape[-1])
    else:
        used = set(site.act_contract) | set(site.act_batch) | set(site.act_summed)
        free = [d for d in range(x.ndim) if d not in used]
        x = jnp.transpose(x, (*site.act_batch, *site.act_summed, *free, *site.act_contract))
        nb = math.prod(x.shape[:len(site.act_batch)])
        x = x.reshape(nb, -1, math.prod(x.shape[x.ndim - len(site.act_contract):]))
    if site.columns is not None:
        x = x[..., np.argsort(site.columns)]
    if site.groups is not None:
        x = x[np.argsort(site.groups)]
    sq = jnp.sum(x * x, axis=1)
    g = (jnp.einsum("gtc,gtd->gcd", x, x, precision=lax.Precision.HIGHEST) if gram else None)
    count = jnp.full(x.shape[:1], x.shape[1], jnp.float32)
    bshape = tuple(shape[a] for a in site.batch_axes)
    return (sq.reshape(*bshape, -1), None if g is None else g.reshape(*bshape, *g.shape[1:]),
            count.reshape(bshape))


class _Collector:
    """Replays a jaxpr, emitting the statistics of every site of the selected leaves."""

    def __init__(self, paths: Sequence[str], shapes: Sequence[tuple], gram: bool) -> None:
        self.paths, self.shapes, self.gram = list(paths), list(shapes), gram

    def run(self, jaxpr, consts, args, views, scope) -> tuple[list, list]:
        env: dict[Any, tuple] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = (c, None)
        for v, x, view in zip(jaxpr.invars, args, views):
            env[v] = (x, view)
        results = []

        def read(v):
            return (v.val, None) if type(v).__name__ == "Literal" else env[v]

        for i, eqn in enumerate(jaxpr.eqns):
            ins = [read(v) for v in eqn.invars]
            vals, vws = [x[0] for x in ins], [x[1] for x in ins]
            name, sub = eqn.primitive.name, scope + (i,)
            out_views = None
            if name in jp.CALL_PARAMS:
                body, body_consts = jp.call(eqn)
                outs, res = self.run(body, body_consts, vals, vws, sub)
                results += res
            elif name == "scan" and any(v is not None for v in vws):
                outs, res = self.scan(eqn, vals, vws, sub)
                results += res
            else:
                site = find_site(eqn, vws, self.paths)
                if site is not None:
                    stats = _site_stats(vals[1 - site.operand], site, self.shapes[site.leaf],
                                        self.gram)
                    results.append((site, stats))
                outs = eqn.primitive.bind(*vals, **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
                out_views = None if site is not None else propagate(eqn, vws)
            out_views = out_views or [None] * len(eqn.outvars)
            for v, x, ov in zip(eqn.outvars, outs, out_views):
                if type(v).__name__ != "DropVar":
                    env[v] = (x, ov)
        return [read(v)[0] for v in jaxpr.outvars], results

    def scan(self, eqn, vals, views, sub) -> tuple[list, list]:
        lay = jp.scan(eqn)
        nc, nk, body = lay.num_consts, lay.num_carry, lay.body
        consts, init, xs = vals[:nc], list(vals[nc:nc + nk]), list(vals[nc + nk:])
        bviews = (list(views[:nc]) + [None] * nk
                  + [slice_view(v, sub, None) for v in views[nc + nk:]])
        sites: list[Site] = []

        def body_fn(carry, x):
            outs, res = self.run(body.jaxpr, body.consts, [*consts, *carry, *x], bviews, sub)
            sites[:] = [s for s, _ in res]
            return outs, [r for _, r in res]

        x0 = [jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype) for x in xs]
        shapes = jax.eval_shape(lambda c, x: body_fn(c, x)[1], init, x0)
        stacked = [any(sid == sub for _, sid, _ in s.scans) for s in sites]
        acc0 = [jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), r)
                for r, st in zip(shapes, stacked) if not st]

        def step(c, x):
            carry, acc = c
            outs, res = body_fn(carry, x)
            summed = [r for r, st in zip(res, stacked) if not st]
            acc = [jax.tree.map(jnp.add, a, r) for a, r in zip(acc, summed)]
            return (outs[:nk], acc), (outs[nk:], [r for r, st in zip(res, stacked) if st])

        (carry, acc), (ys, per_step) = lax.scan(step, (init, acc0), xs, length=lay.length,
                                               reverse=lay.reverse, unroll=lay.unroll)
        acc_it, step_it = iter(acc), iter(per_step)
        res = [(s, next(step_it) if st else next(acc_it)) for s, st in zip(sites, stacked)]
        return list(carry) + list(ys), res


def _canonical(site: Site, stats: tuple) -> tuple:
    """Site-local group order (scanned axes outermost first, then batch axes)
    -> ``site.group_axes`` order."""
    have = [a for a, _, _ in site.scans] + list(site.batch_axes)
    perm = [have.index(a) for a in site.group_axes]
    g = len(perm)
    sq, gram, count = stats
    sq = jnp.transpose(sq, perm + [g])
    gram = None if gram is None else jnp.transpose(gram, perm + [g, g + 1])
    return sq, gram, jnp.transpose(count, perm)


# ----------------------------------------------------------------- tracing
def as_inputs(batch: Any) -> tuple:
    """A calibration batch as the positional inputs after ``variables``."""
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def trace(apply_fn: Callable, variables: PyTree, inputs: tuple, where_name: str) -> Any:
    """The closed jaxpr of ``apply_fn(variables, *inputs)`` over flat leaves."""
    var_leaves, var_def = jax.tree.flatten(variables)
    arg_leaves, arg_def = jax.tree.flatten(inputs)

    def flat_fn(vl, al):
        return apply_fn(jax.tree.unflatten(var_def, vl), *jax.tree.unflatten(arg_def, al))

    try:
        return jax.make_jaxpr(flat_fn)([_abstract(x) for x in var_leaves],
                                       [_abstract(x) for x in arg_leaves])
    except Exception as e:  # flax raises its own error types for shape mismatches
        shapes = [tuple(np.shape(x)) for x in arg_leaves]
        raise ValueError(f"{where_name}: apply_fn(variables, *batch) fails for inputs of shapes "
                         f"{shapes}: {type(e).__name__}: {e}") from e


_TRACES: "collections.OrderedDict[Any, tuple[dict, dict]]" = collections.OrderedDict()


def _traces_of(apply_fn: Callable, variables: PyTree) -> tuple[dict, dict]:
    """Traced jaxprs and compiled calibration steps of ``apply_fn`` at these
    variable shapes, shared by the ``calibrate``/``oneshot`` calls of one
    process (comparing methods and sparsities re-runs the same passes). Like
    ``jax.jit``'s cache this assumes ``apply_fn`` is a pure function of its
    arguments; the 4 most recent models are kept."""
    leaves, treedef = jax.tree.flatten(variables)
    key = (apply_fn, treedef, tuple((tuple(np.shape(x)), str(_abstract(x).dtype)) for x in leaves))
    try:
        hash(key)
    except TypeError:  # an unhashable apply_fn: no sharing
        return {}, {}
    if key in _TRACES:
        _TRACES.move_to_end(key)
    else:
        _TRACES[key] = ({}, {})
        while len(_TRACES) > 4:
            _TRACES.popitem(last=False)
    return _TRACES[key]


class Calibration:
    """A traced model over a list of calibration batches (internal; reused by
    ``jaxprune.oneshot`` for one pass per stage)."""

    def __init__(self, apply_fn: Callable, variables: PyTree, batches: Iterable[Any],
                 where: jtree.Where = None) -> None:
        self.batches = [as_inputs(b) for b in batches]
        if not self.batches:
            raise ValueError("batches is empty: pass at least one calibration batch")
        self.apply_fn = apply_fn
        items = jtree.leaves_with_paths(variables)
        self.paths = [p for p, _ in items]
        self.shapes = [tuple(np.shape(x)) for _, x in items]
        self._jaxprs, self._steps = _traces_of(apply_fn, variables)
        _, closed = self.jaxpr(variables, 0)
        for i in range(1, len(self.batches)):
            self.jaxpr(variables, i)  # every batch must fit the model
        chosen = jtree.select(variables, where)
        self.layers: Layers = analyze_layers(closed, self.paths, self.shapes, chosen)
        unused = [k for k, c in enumerate(chosen) if c and k not in self.layers.sites]
        if where is not None and unused:
            k = unused[0]
            lost = self.layers.lost.get(k)
            why = f" (its value reaches {', '.join(lost)}, which jaxprune does not follow)" if lost else ""
            raise SiteError(f"leaf '{self.paths[k]}' is selected by where={where!r} but no "
                            f"dot_general or conv_general_dilated uses it as a weight{why}; "
                            "select only matmul/convolution weights")
        self.selected = sorted(self.layers.sites)
        if not self.selected:
            raise SiteError("no selected leaf is used as a weight by a dot_general or "
                            "conv_general_dilated of apply_fn")

    def jaxpr(self, variables: PyTree, i: int) -> Any:
        inputs = self.batches[i]
        key = jax.tree.structure(inputs), tuple(
            (tuple(np.shape(x)), str(_abstract(x).dtype)) for x in jax.tree.leaves(inputs))
        if key not in self._jaxprs:
            self._jaxprs[key] = trace(self.apply_fn, variables, inputs, f"batches[{i}]")
        return key, self._jaxprs[key]

    def site_layout(self, k: int) -> tuple:
        site = self.layers.sites[k][0]
        return site.in_axes, site.group_axes

    def collect(self, variables: PyTree, leaves: Optional[Sequence[int]] = None,
                gram: bool = True) -> dict[int, LayerStats]:
        """Statistics of ``leaves`` (leaf indices; default all selected) over every batch."""
        leaves = tuple(sorted(self.selected if leaves is None else leaves))
        var_leaves = jax.tree.leaves(variables)
        acc = None
        for i, inputs in enumerate(self.batches):
            key, closed = self.jaxpr(variables, i)
            step = self._step(key, closed, leaves, gram)
            if acc is None:
                acc = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                   jax.eval_shape(step, None, var_leaves, jax.tree.leaves(inputs)))
            acc = step(acc, var_leaves, jax.tree.leaves(inputs))
        return {k: LayerStats(*acc[k], *self.site_layout(k)) for k in leaves}

    def _step(self, key, closed, leaves: tuple, gram: bool) -> Callable:
        skey = (key, leaves, gram)
        if skey in self._steps:
            return self._steps[skey]
        collector = _Collector(self.paths, self.shapes, gram)
        n = len(self.paths)
        chosen = set(leaves)

        def step(acc, var_leaves, arg_leaves):
            views = [leaf_view(k, self.shapes[k]) if k in chosen else None for k in range(n)]
            views += [None] * len(arg_leaves)
            _, res = collector.run(*jp.sub(closed), list(var_leaves) + list(arg_leaves),
                                   views, ())
            out: dict[int, tuple] = {}
            for site, stats in res:
                stats = _canonical(site, stats)
                out[site.leaf] = stats if site.leaf not in out else jax.tree.map(
                    jnp.add, out[site.leaf], stats)
            if acc is not None:
                out = {k: jax.tree.map(jnp.add, acc[k], out[k]) for k in out}
            return out

        self._steps[skey] = jax.jit(step)
        return self._steps[skey]


def calibrate(apply_fn: Callable, variables: PyTree, batches: Iterable[Any],
              where: jtree.Where = None, *, gram: bool = True) -> dict[str, LayerStats]:
    """Input statistics of every selected weight over calibration batches.

    Traces ``apply_fn(variables, *batch)`` (no change to the model: Linen,
    NNX or plain functions), finds each ``dot_general``/``conv_general_dilated``
    whose weight operand is a selected leaf (possibly through transposes,
    reshapes, casts, broadcasts and ``jit``/``remat``/``custom_jvp``/``scan``)
    and accumulates, in float32 in a jitted loop over ``batches``, the
    per-input-feature squared norms of the other operand (Wanda, Sun et al.
    2023, arXiv 2306.11695) and, with ``gram=True``, its Gram matrix XᵀX (the
    Hessian of SparseGPT, Frantar & Alistarh 2023, arXiv 2301.00774). A
    convolution contributes its patches; a leaf used several times sums its
    uses; a stacked leaf sliced by ``scan`` has per-layer statistics.

    Args:
      apply_fn: ``apply_fn(variables, *inputs)``.
      variables: the model's variables (any pytree).
      batches: iterable of calibration inputs: one array, or a tuple of
        positional inputs, per item.
      where: which leaves (``jaxprune.tree`` selector). ``None``: every
        floating leaf with ``ndim >= 2`` that a matmul or convolution uses.
        An explicit selector that names a leaf no matmul uses is an error.
      gram: also accumulate the Gram matrices (memory: columns² per leaf and
        per group; select fewer leaves with ``where`` to bound it).

    Returns:
      ``{leaf path: LayerStats}`` for the selected leaves.

    >>> import jax.numpy as jnp
    >>> f = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"]
    >>> v = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
    >>> stats = calibrate(f, v, [jnp.array([[1.0, 2.0, 0.0]])])
    >>> stats["w1"].sq_norm.tolist(), stats["w1"].gram.shape, stats["w2"].count.tolist()
    ([1.0, 4.0, 0.0], (3, 3), 1.0)
    """
    cal = Calibration(apply_fn, variables, batches, where)
    stats = cal.collect(variables, gram=gram)
    return {cal.paths[k]: s for k, s in stats.items()}
