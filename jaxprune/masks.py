"""Scores -> boolean masks: unstructured (local/global), N:M, block, channel.

Every function takes a score pytree (see ``jaxprune.scores``) and returns a
mask pytree of the same structure: a bool array (True = keep) for each
selected leaf and ``None`` for every other leaf, so unselected leaves cost no
mask memory. ``jaxprune.apply_masks`` understands that convention.

Counts are exact: a leaf (or, under ``scope="global"``, all selected leaves
together) of ``n`` entries loses exactly ``threshold.prune_count(sparsity, n)``
of them: ``float32(sparsity) * n`` rounded half to even, the same eagerly and
under ``jit``. Ties are broken deterministically by leaf order, then flat
index (earlier entries go first). NaN scores rank lowest and are pruned first.
Scores are "larger = kept"; negative scores warn unless ``signed=True``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import allocation, collapse_guard, diagnostics, threshold
# Re-exported: masks.guarded_stacked and masks.GUARD_SHARE were defined here.
from jaxprune.collapse_guard import GUARD_SHARE, guarded_stacked  # noqa: F401
from jaxprune.tree import (LayerAxis, Where, layer_axes, leaves_with_paths, resolve_where,
                           select)

PyTree = Any
Sparsity = Union[float, jax.Array, Mapping[str, float]]

__all__ = ["unstructured", "n_of_m", "block", "channels", "reduction_axis", "check_options"]


def _selected(scores: PyTree, where: Where):
    items = leaves_with_paths(scores)
    chosen = select(scores, where)
    treedef = jax.tree.structure(scores)
    pairs = [(p, x) for (p, x), c in zip(items, chosen) if c]
    arrays = threshold._as_score_arrays([x for _, x in pairs], [p for p, _ in pairs])
    return [(p, x) for (p, _), x in zip(pairs, arrays)], chosen, treedef


def _rebuild(treedef, chosen: Sequence[bool], masks: Sequence[jax.Array]) -> PyTree:
    it = iter(masks)
    return jax.tree.unflatten(treedef, [next(it) if c else None for c in chosen])


def _normalized(x: jax.Array, normalize: Optional[str], path: str) -> jax.Array:
    if normalize is None:
        return x
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if normalize == "l2":
        return x / jnp.maximum(jnp.linalg.norm(x.reshape(-1)), jnp.finfo(x.dtype).tiny)
    if normalize == "lamp":
        return _lamp(x)
    raise ValueError(f"normalize must be None, 'l2' or 'lamp', got {normalize!r}")


def _lamp(x: jax.Array) -> jax.Array:
    """LAMP score u / sum_{v >= u} v with u = x**2 (Lee et al. 2021, "Layer-
    adaptive Sparsity for the Magnitude-based Pruning", ICLR)."""
    u = jnp.square(x.reshape(-1))
    order = jnp.argsort(u, stable=True)
    sorted_u = u[order]
    suffix = jnp.cumsum(sorted_u[::-1])[::-1]
    lamp_sorted = sorted_u / jnp.maximum(suffix, jnp.finfo(u.dtype).tiny)
    return jnp.zeros_like(u).at[order].set(lamp_sorted).reshape(x.shape)


def check_options(scope: str, normalize: Optional[str] = None,
                  min_density: Optional[float] = None) -> None:
    """Raises for options that would do nothing: ``normalize`` and
    ``min_density`` act on the one global ranking only."""
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if min_density is not None:
        allocation.check_sparsity(min_density, "min_density")
    if scope == "local":
        if normalize is not None:
            raise ValueError(f"normalize={normalize!r} rescales leaves for one global ranking; "
                             "with scope='local' each leaf is ranked alone and it would do "
                             "nothing: use scope='global' or drop normalize")
        if min_density:
            raise ValueError(f"min_density={min_density} guards the global ranking; with "
                             "scope='local' every leaf keeps 1 - sparsity of its entries: use "
                             "scope='global', or a per-leaf sparsity mapping")
    if normalize not in (None, "l2", "lamp"):
        raise ValueError(f"normalize must be None, 'l2' or 'lamp', got {normalize!r}")


def _checked_sparsity(sparsity, reporter: diagnostics.Reporter):
    """A traced sparsity outside [0, 1] (or NaN) is clipped where it is
    counted; say so rather than prune 0% or 100% silently."""
    if isinstance(sparsity, jax.core.Tracer) and not reporter.sparsity_valid:
        def fmt(v):
            v = np.asarray(v, np.float64)
            bad = v[~((v >= 0) & (v <= 1))]
            return None if bad.size == 0 else (
                f"sparsity {bad.reshape(-1)[0]} is outside [0, 1] and was clipped to "
                f"{np.clip(np.nan_to_num(bad.reshape(-1)[0]), 0.0, 1.0)}")
        reporter.report([("sparsity", jnp.asarray(sparsity, jnp.float32), fmt)])


def _negative_check(paths, xs, elementwise, signed: bool):
    """A check that warns when scores hold negative values (raw weights
    passed as scores) unless they are ``signed`` on purpose."""
    if signed or elementwise is jnp.abs:
        return None
    flags = _any_negative(xs, elementwise)
    return ("negative", flags, lambda found: None if not found.any() else
            diagnostics.negative_message(diagnostics.leaves_flagged(paths, found)))


@functools.partial(jax.jit, static_argnums=1)  # eagerly: one program, not one per leaf
def _any_negative(xs, elementwise=None):
    f = (lambda x: x) if elementwise is None else elementwise
    return jnp.stack([jnp.any(f(x) < 0) for x in xs])


def _prune_leaves(paths: Sequence[str], xs: Sequence[jax.Array], sparsity: Sparsity,
                  scope: str, distribution: Any = "uniform", normalize: Optional[str] = None,
                  min_density: Optional[float] = None,
                  kept: Optional[Sequence[Optional[jax.Array]]] = None,
                  elementwise: Optional[Callable] = None, signed: bool = False,
                  reporter: Optional[diagnostics.Reporter] = None,
                  axes: Optional[Sequence[Optional[int]]] = None) -> list[jax.Array]:
    """Keep-masks (True = keep) for a list of score arrays; the shared engine
    of unstructured, block and channel masks. Entries where ``kept`` is False
    rank lowest, and ``elementwise`` maps the arrays to scores inside the
    threshold passes (see ``threshold.lowest``). ``axes[i]`` (a layer axis
    or None) makes every slice of leaf ``i`` along it a leaf of its own."""
    reporter = reporter or diagnostics.Reporter()
    check_options(scope, normalize, min_density)
    kept = list(kept) if kept is not None else [None] * len(xs)
    axes = list(axes) if axes is not None else [None] * len(xs)
    if scope == "global" and any(a is not None for a in axes):
        return _global_per_layer(paths, xs, sparsity, distribution, normalize, min_density,
                                 kept, elementwise, signed, reporter, axes)
    if scope == "local":
        # A stacked leaf's layers are rows of their own (layer axis moved first).
        rows = [a is not None for a in axes]
        moved = [x if a is None else jnp.moveaxis(x, a, 0) for x, a in zip(xs, axes)]
        kept_moved = [d if d is None or a is None else jnp.moveaxis(d, a, 0)
                      for d, a in zip(kept, axes)]
        vpaths, vshapes, owner = [], [], []
        for i, (p, x) in enumerate(zip(paths, moved)):
            n = x.shape[0] if rows[i] else 1
            vpaths += [p] * n
            vshapes += [tuple(x.shape[1:]) if rows[i] else tuple(x.shape)] * n
            owner += [i] * n
        per_slice = allocation.allocate(sparsity, distribution, vpaths, vshapes)
        if not isinstance(sparsity, Mapping) and not isinstance(distribution, Mapping):
            _checked_sparsity(sparsity, reporter)
        reporter.report([_negative_check(paths, xs, elementwise, signed)])
        counts: list = [[] for _ in xs]
        per_count = threshold.prune_counts(per_slice, [int(np.prod(v)) for v in vshapes])
        for i, c in zip(owner, per_count):
            counts[i].append(c)
        counts = [c[0] if not r else jnp.stack([jnp.asarray(v, jnp.uint32) for v in c])
                  for c, r in zip(counts, rows)]
        keep = threshold._select_each(moved, counts, kept_moved, elementwise, keep=True,
                                      rows=rows)
        return [k if a is None else jnp.moveaxis(k, 0, a) for k, a in zip(keep, axes)]
    if isinstance(sparsity, Mapping) or distribution != "uniform":
        raise ValueError("scope='global' ranks all leaves by one threshold; per-leaf "
                         "sparsity mappings and distribution='erk' need scope='local'")
    allocation.check_sparsity(sparsity)
    _checked_sparsity(sparsity, reporter)
    checks = [_negative_check(paths, xs, elementwise, signed)]
    if normalize is not None and elementwise is not None:
        xs, elementwise = [elementwise(x) for x in xs], None  # normalising needs the scores
    xs = [_normalized(x, normalize, p) for p, x in zip(paths, xs)]
    total = sum(x.size for x in xs)
    n_prune = threshold.prune_count(sparsity, total)
    if min_density == 0.0 or len(xs) < 2:
        reporter.report(checks)
        # Keep-masks straight from the selection: no negated copy is written.
        return threshold._select(xs, n_prune, None, None, kept, elementwise, keep=True)
    keep, guard_checks = collapse_guard._guarded(paths, xs, sparsity, min_density, kept,
                                                 elementwise, n_prune, total)
    reporter.report(checks + guard_checks)
    return keep


def _global_per_layer(paths, xs, sparsity, distribution, normalize, min_density, kept,
                      elementwise, signed, reporter, axes):
    """Global scope with stacked leaves: every layer slice takes part as a
    leaf of its own (named ``path[j]``), so the layer-collapse guard and
    ``normalize`` act per layer; the masks are stacked back."""
    traced = any(isinstance(v, jax.core.Tracer) for v in [sparsity, *xs, *kept])
    if traced and normalize is None and min_density != 0.0:
        keep, guard_checks = collapse_guard._global_rows(
            paths, xs, sparsity, min_density, kept, elementwise, axes, per_leaf=reporter.collect)
        _checked_sparsity(sparsity, reporter)
        reporter.report([_negative_check(paths, xs, elementwise, signed)] + guard_checks)
        return keep
    vpaths, vxs, vkept, spans = [], [], [], []
    for p, x, d, a in zip(paths, xs, kept, axes):
        if a is None:
            vpaths.append(p), vxs.append(x), vkept.append(d), spans.append(1)
            continue
        n = x.shape[a]
        vpaths += [f"{p}[{j}]" for j in range(n)]
        vxs += [lax.index_in_dim(x, j, a, keepdims=False) for j in range(n)]
        vkept += [None if d is None else lax.index_in_dim(d, j, a, keepdims=False)
                  for j in range(n)]
        spans.append(n)
    # Warnings name the layer (path[j]); collected flags are per leaf (any layer).
    inner = diagnostics.Reporter(collect=True, sparsity_valid=reporter.sparsity_valid) \
        if reporter.collect else reporter
    keep = _prune_leaves(vpaths, vxs, sparsity, "global", distribution, normalize, min_density,
                         vkept, elementwise, signed, inner)
    if reporter.collect:
        bounds = np.cumsum([0] + spans)
        reporter.report([(kind, flags if jnp.ndim(flags) == 0 or flags.shape[0] != len(vxs) else
                          jnp.stack([jnp.any(flags[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]),
                          None) for kind, flags in inner.found.items()])
    out, start = [], 0
    for n, a in zip(spans, axes):
        out.append(keep[start] if a is None else jnp.stack(keep[start:start + n], axis=a))
        start += n
    return out


def unstructured(scores: PyTree, sparsity: Sparsity, *, scope: str = "local",
                 where: Where = None, distribution: Any = "uniform",
                 normalize: Optional[str] = None, min_density: Optional[float] = None,
                 signed: bool = False, layer_axis: LayerAxis = None) -> PyTree:
    """Unstructured masks keeping the highest scores (magnitude pruning: Han et
    al. 2015; global ranking with LAMP normalisation: Lee et al. 2021; ERK
    allocation: Evci et al. 2020).

    Args:
      scores: pytree of score arrays (larger = more important).
      sparsity: fraction pruned, in [0, 1] (a Python float, a traced scalar,
        or a mapping ``{path_regex: sparsity}`` for ``scope="local"``).
      scope: "local" prunes ``prune_count(s, n_leaf)`` of every leaf;
        "global" prunes ``prune_count(s, N)`` of all selected leaves by one
        threshold (see ``jaxprune.threshold.prune_count`` for the rule).
      where: which leaves to prune (see ``jaxprune.tree``).
      distribution: for local scope, "uniform", "erk" or ``{path_regex: s}``.
      normalize: for global scope, rescale each leaf's scores first: None,
        "l2" (divide by the leaf's L2 norm) or "lamp".
      min_density: for global scope, the layer-collapse guard: every leaf
        keeps at least ``ceil(min_density * n_leaf)`` entries; ``0.0`` turns
        the guard off. Default (None): at least a tenth of the leaf's uniform
        share, ``ceil((n_leaf - prune_count(s, n_leaf)) / 10)``, with a
        ``PruningWarning`` naming the leaves whenever this changes the masks.
      signed: the scores are signed on purpose (movement pruning). Without
        it, negative scores warn: raw weights were probably passed where
        ``jaxprune.scores.magnitude(params)`` was meant.
      layer_axis: for stacked (scanned) layers, the axis of a leaf that
        indexes layers: an int for every selected leaf, a mapping
        ``{path_regex: axis}`` or a callable ``(path, leaf) -> axis | None``
        (``jaxprune.tree.scan_axes(variables)`` reads it from Flax
        ``nn.scan`` / ``nnx.vmap`` partitioning metadata). Every slice along
        it is then pruned exactly as if it were a leaf of its own: local
        counts and ERK/uniform allocation per layer, and under global scope
        the layer-collapse guard (``min_density``) per layer.

    Layer collapse: one global threshold over magnitudes can empty a whole
    layer whose weights are small at initialisation, which disconnects the
    network (Tanaka et al. 2020, SynFlow, call this "layer collapse"; Lee et
    al. 2021, LAMP, show global magnitude pruning doing it). The default
    guard (``jaxprune.collapse_guard``) rules it out while leaving ordinary
    global allocations alone: a leaf is only held back when the threshold
    would keep less than a tenth of what uniform pruning gives it (1% density
    at 90% sparsity), the entries it keeps are its own highest scores, and
    the total count is unchanged (the other leaves give up the difference).
    It costs one count per leaf; the re-selection runs only when a leaf is
    below its floor. ``normalize="lamp"`` is the alternative that changes the
    ranking itself.

    Returns:
      A pytree like ``scores``: bool masks (True = keep) on selected leaves,
      ``None`` elsewhere.

    >>> import jax.numpy as jnp
    >>> m = unstructured({"w": jnp.array([[3.0, 1.0], [2.0, 4.0]])}, 0.5)
    >>> m["w"].tolist()
    [[True, False], [False, True]]
    >>> stacked = {"w": jnp.array([[[3.0, 1.0], [2.0, 4.0]], [[1.0, 5.0], [6.0, 2.0]]])}
    >>> unstructured(stacked, 0.5, layer_axis=0)["w"].astype(int).tolist()  # half of each layer
    [[[1, 0], [0, 1]], [[0, 1], [1, 0]]]
    """
    return _unstructured(scores, sparsity, scope, where, distribution, normalize, min_density,
                         signed=signed, layer_axis=layer_axis)


def _unstructured(scores: PyTree, sparsity: Sparsity, scope: str, where: Where,
                  distribution: Any, normalize: Optional[str], min_density: Optional[float],
                  kept: Optional[PyTree] = None,
                  elementwise: Optional[Callable] = None, signed: bool = False,
                  reporter: Optional[diagnostics.Reporter] = None,
                  layer_axis: LayerAxis = None) -> PyTree:
    """``unstructured`` where entries with ``kept`` False (a mask-like tree)
    rank lowest and ``elementwise`` maps the leaves of ``scores`` to scores
    inside the threshold passes (``jnp.abs`` on params: magnitude pruning
    without storing ``|w|``)."""
    where = resolve_where(where, layer_axis)
    picked, chosen, treedef = _selected(scores, where)
    paths = [p for p, _ in picked]
    kept_leaves = None
    if kept is not None:
        flat = jax.tree.leaves(kept, is_leaf=lambda x: x is None)
        kept_leaves = [d for d, c in zip(flat, chosen) if c]
    keep = _prune_leaves(paths, [x for _, x in picked], sparsity, scope,
                         distribution, normalize, min_density, kept_leaves, elementwise,
                         signed, reporter, layer_axes(picked, layer_axis))
    return _rebuild(treedef, chosen, keep)


def _axis(path: str, ndim: int, axis: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"leaf '{path}' has {ndim} dimension(s); {what} axis={axis} does not exist")
    return axis % ndim


def reduction_axis(ndim: int) -> int:
    """The input (reduction) axis of a Flax kernel: 0 for Dense ``(in, out)``,
    ``ndim - 2`` for Conv ``(*window, in, out)``; 0 for a vector."""
    return max(ndim - 2, 0)


def n_of_m(scores: PyTree, n: int = 2, m: int = 4, axis: Optional[int] = None,
           where: Where = None, *, signed: bool = False, layer_axis: LayerAxis = None) -> PyTree:
    """N:M semi-structured masks: exactly ``n`` of every ``m`` consecutive
    entries along ``axis`` are kept (Mishra et al. 2021, "Accelerating Sparse
    Deep Neural Networks"; Zhou et al. 2021).

    2:4 along the reduction (input) axis of a matmul is what Ampere/Hopper
    sparse tensor cores run, so that is the default (``axis=None``): axis 0
    of a Flax ``Dense`` kernel ``(in, out)``, the input-channel axis
    ``ndim - 2`` of a ``Conv`` kernel ``(h, w, in, out)``
    (``reduction_axis``). Pass ``axis`` for other layouts. A leaf whose
    length along the axis is not a multiple of ``m`` is an error naming the
    leaf and the axis. ``signed`` as in ``unstructured``.

    >>> import jax.numpy as jnp
    >>> n_of_m({"w": jnp.array([[1.0], [4.0], [2.0], [3.0]])}, 2, 4)["w"].ravel().tolist()
    [False, True, False, True]
    """
    return _n_of_m(scores, n, m, axis, where, signed, layer_axis=layer_axis)


def _n_of_m(scores, n, m, axis, where, signed, reporter=None, layer_axis=None) -> PyTree:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 <= n <= m:
        raise ValueError(f"n_of_m needs integers 0 <= n <= m and m >= 1, got n={n}, m={m}")
    where = resolve_where(where, layer_axis)
    picked, chosen, treedef = _selected(scores, where)
    out = []
    for (path, x), layer in zip(picked, layer_axes(picked, layer_axis)):
        if axis is not None:
            ax = _axis(path, x.ndim, axis, "n_of_m")
        elif layer is None:
            ax = reduction_axis(x.ndim)
        else:  # the reduction axis of one layer slice, counted in the stacked leaf
            ax = reduction_axis(x.ndim - 1)
            ax = ax + 1 if ax >= layer else ax
        if x.shape[ax] % m:
            what = (f"its reduction axis {ax} (the default)" if axis is None
                    else f"axis {axis}")
            raise ValueError(
                f"n_of_m: leaf '{path}' of shape {tuple(x.shape)} has length {x.shape[ax]} on "
                f"{what}, not a multiple of m={m}. Pass axis= for a divisible axis, or leave "
                f"the leaf out with where= (e.g. a classifier head)")
        out.append(_n_of_m_leaf(x, n, m, ax))
    (reporter or diagnostics.Reporter()).report(
        [_negative_check([p for p, _ in picked], [x for _, x in picked], None, signed)])
    return _rebuild(treedef, chosen, out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # eagerly: one program per leaf shape
def _n_of_m_leaf(x: jax.Array, n: int, m: int, ax: int) -> jax.Array:
    moved = jnp.moveaxis(x, ax, -1)
    keys = threshold.order_keys(moved, x.dtype.itemsize > 4)
    keys = keys.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    idx = jnp.arange(m)
    below = jnp.zeros(keys.shape, jnp.int32)
    for j in range(m):  # m is small and static: m fused compares, no sort
        kj = keys[..., j:j + 1]
        below += (kj < keys) | ((kj == keys) & (j < idx))
    keep = (below >= m - n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, ax)


def block(scores: PyTree, sparsity: Sparsity, block_shape: tuple[int, int] = (4, 4),
          reduce: str = "mean", where: Where = None, *, scope: str = "local",
          signed: bool = False) -> PyTree:
    """Block masks: the last two axes are tiled by ``block_shape`` and whole
    blocks are kept or pruned by their reduced score (mean or max).

    Block sparsity is what block-sparse kernels accelerate (e.g. Gray et al.
    2017, "GPU Kernels for Block-Sparse Weights"). Leading axes (e.g. the
    spatial axes of a conv kernel) give more blocks. ``scope="global"`` ranks
    blocks of all leaves together with the default layer-collapse guard of
    ``unstructured`` (in blocks); ``signed`` as in ``unstructured``.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    >>> block({"w": w}, 0.5, (2, 2))["w"].tolist()
    [[False, False, True, True], [False, False, True, True]]
    """
    return _block(scores, sparsity, block_shape, reduce, where, scope, signed)


def _block(scores, sparsity, block_shape, reduce, where, scope, signed, reporter=None):
    reducers = {"mean": jnp.mean, "max": jnp.max}
    if reduce not in reducers:
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    bh, bw = block_shape
    if bh < 1 or bw < 1:
        raise ValueError(f"block_shape must be positive, got {block_shape}")
    picked, chosen, treedef = _selected(scores, where)
    block_scores, shapes = [], []
    for path, x in picked:
        if x.ndim < 2:
            raise ValueError(f"leaf '{path}' has {x.ndim} dimension(s); block masks need 2 or more")
        h, w = x.shape[-2:]
        if h % bh or w % bw:
            raise ValueError(f"leaf '{path}' of shape {x.shape} is not divisible into "
                             f"blocks of {block_shape}")
        tiled = x.reshape(*x.shape[:-2], h // bh, bh, w // bw, bw)
        block_scores.append(reducers[reduce](tiled, axis=(-3, -1)))
        shapes.append(x.shape)
    keep = _prune_leaves([p for p, _ in picked], block_scores, sparsity, scope,
                         signed=signed, reporter=reporter)
    full = [jnp.broadcast_to(k[..., :, None, :, None],
                             (*k.shape[:-1], bh, k.shape[-1], bw)).reshape(s)
            for k, s in zip(keep, shapes)]
    return _rebuild(treedef, chosen, full)


def channels(scores: PyTree, sparsity: Sparsity, axis: int = -1, where: Where = None,
             *, scope: str = "local", reduce: str = "mean", normalize: Optional[str] = None,
             min_density: Optional[float] = None, signed: bool = False) -> PyTree:
    """Channel (neuron / filter) masks: whole slices along ``axis`` are kept
    or pruned by their reduced score (L1-norm filter pruning when the scores
    are magnitudes: Li et al. 2017, "Pruning Filters for Efficient ConvNets").

    The arrays keep their shape; ``jaxprune.structured`` removes the slices
    for real. ``reduce="mean"`` makes channel scores of leaves with different
    fan-in comparable under ``scope="global"``, where the layer-collapse
    guard of ``unstructured`` works in channels: by default no leaf loses
    all of its channels (``min_density=0.0`` allows it). ``normalize``,
    ``min_density`` and ``signed`` as in ``unstructured``.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 5.0, 0.1], [1.0, 5.0, 0.1]])
    >>> channels({"w": w}, 1 / 3)["w"].tolist()
    [[True, True, False], [True, True, False]]
    """
    return _channels(scores, sparsity, axis, where, scope, reduce, normalize, min_density,
                     signed)


def _channels(scores, sparsity, axis, where, scope, reduce, normalize, min_density, signed,
              reporter=None):
    reducers = {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}
    if reduce not in reducers:
        raise ValueError(f"reduce must be 'mean', 'sum' or 'max', got {reduce!r}")
    picked, chosen, treedef = _selected(scores, where)
    per_channel, axes = [], []
    for path, x in picked:
        ax = _axis(path, x.ndim, axis, "channel")
        others = tuple(i for i in range(x.ndim) if i != ax)
        per_channel.append(reducers[reduce](x, axis=others) if others else x)
        axes.append(ax)
    keep = _prune_leaves([p for p, _ in picked], per_channel, sparsity, scope,
                         normalize=normalize, min_density=min_density, signed=signed,
                         reporter=reporter)
    full = [jnp.broadcast_to(jnp.expand_dims(k, [i for i in range(x.ndim) if i != ax]), x.shape)
            for k, ax, (_, x) in zip(keep, axes, picked)]
    return _rebuild(treedef, chosen, full)
