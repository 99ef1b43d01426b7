"""Scores -> boolean masks: unstructured (local/global), N:M, block, channel.

Every function takes a score pytree (see ``jaxprune.scores``) and returns a
mask pytree of the same structure: a bool array (True = keep) for each
selected leaf and ``None`` for every other leaf, so unselected leaves cost no
mask memory. ``jaxprune.apply_masks`` understands that convention.

Counts are exact: a leaf (or, under ``scope="global"``, all selected leaves
together) of ``n`` entries loses exactly ``round(sparsity * n)`` of them. Ties
are broken deterministically by leaf order, then flat index (earlier entries
go first). NaN scores rank lowest and are pruned first.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jaxprune import allocation, threshold
from jaxprune.tree import Where, leaves_with_paths, select

PyTree = Any
Sparsity = Union[float, jax.Array, Mapping[str, float]]

__all__ = ["unstructured", "n_of_m", "block", "channels"]


def _selected(scores: PyTree, where: Where):
    items = leaves_with_paths(scores)
    chosen = select(scores, where)
    treedef = jax.tree.structure(scores)
    picked = [(p, jnp.asarray(x)) for (p, x), c in zip(items, chosen) if c]
    return picked, chosen, treedef


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


def _prune_leaves(paths: Sequence[str], xs: Sequence[jax.Array], sparsity: Sparsity,
                  scope: str, distribution: Any = "uniform", normalize: Optional[str] = None,
                  min_density: float = 0.0,
                  kept: Optional[Sequence[Optional[jax.Array]]] = None,
                  elementwise: Optional[Callable] = None) -> list[jax.Array]:
    """Keep-masks (True = keep) for a list of score arrays; the shared engine
    of unstructured, block and channel masks. Entries where ``kept`` is False
    rank lowest, and ``elementwise`` maps the arrays to scores inside the
    threshold passes (see ``threshold.lowest``)."""
    kept = list(kept) if kept is not None else [None] * len(xs)
    if scope == "local":
        per_leaf = allocation.allocate(sparsity, distribution, paths,
                                       [tuple(x.shape) for x in xs])
        return [threshold._select([x], threshold.prune_count(s, x.size), None, None, [d],
                                  elementwise, keep=True)[0]
                for x, s, d in zip(xs, per_leaf, kept)]
    if scope != "global":
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if isinstance(sparsity, Mapping) or distribution != "uniform":
        raise ValueError("scope='global' ranks all leaves by one threshold; per-leaf "
                         "sparsity mappings and distribution='erk' need scope='local'")
    allocation.check_sparsity(sparsity)
    allocation.check_sparsity(min_density, "min_density")
    if normalize is not None and elementwise is not None:
        xs, elementwise = [elementwise(x) for x in xs], None  # normalising needs the scores
    xs = [_normalized(x, normalize, p) for p, x in zip(paths, xs)]
    total = sum(x.size for x in xs)
    n_prune = threshold.prune_count(sparsity, total)
    protected = None
    if min_density > 0.0:
        # Each leaf's top ceil(min_density * n) entries rank above every other
        # score, so one global threshold cannot empty a layer (layer collapse).
        keep_n = [min(math.ceil(min_density * x.size), x.size) for x in xs]
        protected = [threshold._select([x], x.size - k, None, None, [d], elementwise,
                                       keep=True)[0]
                     for x, k, d in zip(xs, keep_n, kept)]
        free = total - sum(keep_n)
        if isinstance(n_prune, int) and n_prune > free:
            raise ValueError(
                f"sparsity={sparsity} prunes {n_prune} of {total} entries but "
                f"min_density={min_density} keeps {sum(keep_n)}; lower one of them")
        n_prune = min(n_prune, free) if isinstance(n_prune, int) else jnp.minimum(n_prune, free)
    # Keep-masks straight from the selection: no negated copy is written.
    return threshold._select(xs, n_prune, protected, None, kept, elementwise, keep=True)


def unstructured(scores: PyTree, sparsity: Sparsity, *, scope: str = "local",
                 where: Where = None, distribution: Any = "uniform",
                 normalize: Optional[str] = None, min_density: float = 0.0) -> PyTree:
    """Unstructured masks keeping the highest scores (magnitude pruning: Han et
    al. 2015; global ranking with LAMP normalisation: Lee et al. 2021; ERK
    allocation: Evci et al. 2020).

    Args:
      scores: pytree of score arrays (larger = more important).
      sparsity: fraction pruned, in [0, 1] (a Python float, a traced scalar,
        or a mapping ``{path_regex: sparsity}`` for ``scope="local"``).
      scope: "local" prunes ``round(s * n_leaf)`` of every leaf; "global"
        prunes ``round(s * N)`` of all selected leaves by one threshold.
      where: which leaves to prune (see ``jaxprune.tree``).
      distribution: for local scope, "uniform", "erk" or ``{path_regex: s}``.
      normalize: for global scope, rescale each leaf's scores first: None,
        "l2" (divide by the leaf's L2 norm) or "lamp".
      min_density: for global scope, every leaf keeps at least
        ``ceil(min_density * n_leaf)`` entries.

    Returns:
      A pytree like ``scores``: bool masks (True = keep) on selected leaves,
      ``None`` elsewhere.

    >>> import jax.numpy as jnp
    >>> m = unstructured({"w": jnp.array([[3.0, 1.0], [2.0, 4.0]])}, 0.5)
    >>> m["w"].tolist()
    [[True, False], [False, True]]
    """
    return _unstructured(scores, sparsity, scope, where, distribution, normalize, min_density)


def _unstructured(scores: PyTree, sparsity: Sparsity, scope: str, where: Where,
                  distribution: Any, normalize: Optional[str], min_density: float,
                  kept: Optional[PyTree] = None,
                  elementwise: Optional[Callable] = None) -> PyTree:
    """``unstructured`` where entries with ``kept`` False (a mask-like tree)
    rank lowest and ``elementwise`` maps the leaves of ``scores`` to scores
    inside the threshold passes (``jnp.abs`` on params: magnitude pruning
    without storing ``|w|``)."""
    picked, chosen, treedef = _selected(scores, where)
    paths = [p for p, _ in picked]
    kept_leaves = None
    if kept is not None:
        flat = jax.tree.leaves(kept, is_leaf=lambda x: x is None)
        kept_leaves = [d for d, c in zip(flat, chosen) if c]
    keep = _prune_leaves(paths, [x for _, x in picked], sparsity, scope,
                         distribution, normalize, min_density, kept_leaves, elementwise)
    return _rebuild(treedef, chosen, keep)


def _axis(path: str, ndim: int, axis: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"leaf '{path}' has {ndim} dimension(s); {what} axis={axis} does not exist")
    return axis % ndim


def n_of_m(scores: PyTree, n: int = 2, m: int = 4, axis: int = -1,
           where: Where = None) -> PyTree:
    """N:M semi-structured masks: exactly ``n`` of every ``m`` consecutive
    entries along ``axis`` are kept (Mishra et al. 2021, "Accelerating Sparse
    Deep Neural Networks"; Zhou et al. 2021). 2:4 along the reduction axis is
    what Ampere/Hopper sparse tensor cores run; for a Flax ``Dense`` kernel
    of shape (in, out) that is ``axis=0``.

    >>> import jax.numpy as jnp
    >>> n_of_m({"w": jnp.array([[1.0, 4.0, 2.0, 3.0]])}, 2, 4)["w"].tolist()
    [[False, True, False, True]]
    """
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 <= n <= m:
        raise ValueError(f"n_of_m needs integers 0 <= n <= m and m >= 1, got n={n}, m={m}")
    picked, chosen, treedef = _selected(scores, where)
    out = []
    for path, x in picked:
        ax = _axis(path, x.ndim, axis, "n_of_m")
        if x.shape[ax] % m:
            raise ValueError(f"leaf '{path}' has length {x.shape[ax]} on axis {axis}, "
                             f"not divisible by m={m}")
        moved = jnp.moveaxis(x, ax, -1)
        keys = threshold.order_keys(moved, x.dtype.itemsize > 4)
        keys = keys.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
        idx = jnp.arange(m)
        below = jnp.zeros(keys.shape, jnp.int32)
        for j in range(m):  # m is small and static: m fused compares, no sort
            kj = keys[..., j:j + 1]
            below += (kj < keys) | ((kj == keys) & (j < idx))
        keep = (below >= m - n).reshape(moved.shape)
        out.append(jnp.moveaxis(keep, -1, ax))
    return _rebuild(treedef, chosen, out)


def block(scores: PyTree, sparsity: Sparsity, block_shape: tuple[int, int] = (4, 4),
          reduce: str = "mean", where: Where = None, *, scope: str = "local") -> PyTree:
    """Block masks: the last two axes are tiled by ``block_shape`` and whole
    blocks are kept or pruned by their reduced score (mean or max).

    Block sparsity is what block-sparse kernels accelerate (e.g. Gray et al.
    2017, "GPU Kernels for Block-Sparse Weights"). Leading axes (e.g. the
    spatial axes of a conv kernel) give more blocks.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    >>> block({"w": w}, 0.5, (2, 2))["w"].tolist()
    [[False, False, True, True], [False, False, True, True]]
    """
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
    keep = _prune_leaves([p for p, _ in picked], block_scores, sparsity, scope)
    full = [jnp.broadcast_to(k[..., :, None, :, None],
                             (*k.shape[:-1], bh, k.shape[-1], bw)).reshape(s)
            for k, s in zip(keep, shapes)]
    return _rebuild(treedef, chosen, full)


def channels(scores: PyTree, sparsity: Sparsity, axis: int = -1, where: Where = None,
             *, scope: str = "local", reduce: str = "mean", normalize: Optional[str] = None,
             min_density: float = 0.0) -> PyTree:
    """Channel (neuron / filter) masks: whole slices along ``axis`` are kept
    or pruned by their reduced score (L1-norm filter pruning when the scores
    are magnitudes: Li et al. 2017, "Pruning Filters for Efficient ConvNets").

    The arrays keep their shape; ``jaxprune.structured`` removes the slices
    for real. ``reduce="mean"`` makes channel scores of leaves with different
    fan-in comparable under ``scope="global"``.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 5.0, 0.1], [1.0, 5.0, 0.1]])
    >>> channels({"w": w}, 1 / 3)["w"].tolist()
    [[True, True, False], [True, True, False]]
    """
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
                         normalize=normalize, min_density=min_density)
    full = [jnp.broadcast_to(jnp.expand_dims(k, [i for i in range(x.ndim) if i != ax]), x.shape)
            for k, ax, (_, x) in zip(keep, axes, picked)]
    return _rebuild(treedef, chosen, full)
