"""Sparse training: RigL, SET, static sparse masks, fixed masks and STE.

Dynamic sparse training keeps a fixed number of active weights per leaf and,
every ``every`` steps, drops the smallest-magnitude active ones and grows the
same number among inactive ones: by gradient magnitude in RigL (Evci et al.
2020, "Rigging the Lottery: Making All Tickets Winners"), at random in SET
(Mocanu et al. 2018, "Scalable Training of Artificial Neural Networks with
Adaptive Sparse Connectivity inspired by Network Science"). Counts are exact
(``jaxprune.threshold.lowest``: no sort, deterministic ties), so every leaf
keeps exactly its allocated number of active weights throughout training.

As in RigL's reference implementation, the optimizer step of a mask-update
step uses the weights active both before and after the update; a weight grown
at that step enters at exactly 0.0 with zeroed optimizer state (e.g. Adam
moments) and first moves on the next step. Dropped weights are exactly 0.0.

``ste`` is different: the dense weights are trained and the masks are only
tracked in the optimizer state; the forward pass uses ``ste_apply(params,
masks)``, whose gradient reaches the pruned dense weights (straight-through
estimator: Bengio et al. 2013; Zhou et al. 2021).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import allocation, leaf_groups, threshold
from jaxprune import scores as score_fns
from jaxprune.criteria import Criterion
from jaxprune.schedules import SparsitySchedule
from jaxprune.transform import MaskRule, _Checks, _prune, pruned, schedule_rule
from jaxprune.tree import (LayerAxis, Where, check_same_structure, is_mask_leaf, layer_axes,
                           leaves_with_paths, resolve_where, select)

PyTree = Any
DropFraction = Union[float, Callable[[jax.Array], jax.Array]]

__all__ = ["rigl", "sparse_evolutionary", "static_sparse", "fixed_masks", "random_masks",
           "drop_and_grow", "ste", "ste_apply"]


def _is_none(x: Any) -> bool:
    return x is None


def _map_masks(fn: Callable, masks: PyTree, *trees: PyTree) -> PyTree:
    """``fn(mask, *leaves)`` on selected leaves; ``None`` stays ``None``."""
    return jax.tree.map(lambda m, *xs: None if m is None else fn(m, *xs),
                        masks, *trees, is_leaf=_is_none)


def random_masks(params: PyTree, sparsity: Any, key: jax.Array, *,
                 distribution: Any = "erk", where: Where = None,
                 layer_axis: LayerAxis = None) -> PyTree:
    """Random masks with exactly ``round(s_leaf * n_leaf)`` pruned entries per
    leaf, ``s_leaf`` from ``distribution`` ("erk": Evci et al. 2020; "uniform";
    or ``{path_regex: sparsity}``). The initial masks of RigL, SET and static
    sparse training. With ``layer_axis`` (as in
    ``jaxprune.masks.unstructured``) each layer slice of a stacked leaf is
    allocated and counted as a leaf of its own.

    >>> import jax, jax.numpy as jnp
    >>> m = random_masks({"w": jnp.ones((4, 4))}, 0.75, jax.random.key(0),
    ...                  distribution="uniform")
    >>> int(m["w"].sum())
    4
    """
    chosen = select(params, where, layer_axis=layer_axis)
    items = leaves_with_paths(params)
    picked = [(path, x) for (path, x), c in zip(items, chosen) if c]
    axes = layer_axes(picked, layer_axis)
    # One allocation over every layer slice (a stacked leaf counts its layers).
    vpaths, vshapes = [], []
    for (path, x), a in zip(picked, axes):
        shape = tuple(jnp.shape(x))
        n = 1 if a is None else shape[a]
        vpaths += [path] * n
        vshapes += [shape if a is None else shape[:a] + shape[a + 1:]] * n
    per_slice = iter(allocation.allocate(sparsity, distribution, vpaths, vshapes))
    keys = iter(jax.random.split(key, len(picked)))
    leaf_axes = iter(axes)
    out = []
    for (_, x), c in zip(items, chosen):
        if not c:
            out.append(None)
            continue
        a, k, shape = next(leaf_axes), next(keys), tuple(jnp.shape(x))
        if a is None:
            n = int(np.prod(shape))
            out.append(_random_mask(k, n - threshold.prune_count(next(per_slice), n), shape))
            continue
        inner = shape[:a] + shape[a + 1:]
        n = int(np.prod(inner))
        keep = jnp.stack([jnp.asarray(n - threshold.prune_count(next(per_slice), n))
                          for _ in range(shape[a])])
        layers = jax.vmap(lambda kk, nk: _random_mask(kk, nk, inner))(
            jax.random.split(k, shape[a]), keep)
        out.append(jnp.moveaxis(layers, 0, a))
    return jax.tree.unflatten(jax.tree.structure(params), out)


@functools.partial(jax.jit, static_argnames="shape")
def _random_mask(key: jax.Array, n_keep, shape: tuple) -> jax.Array:
    # The first n_keep ranks of a random permutation: an exact count, no selection pass.
    rank = jax.random.permutation(key, int(np.prod(shape)))
    return (rank < n_keep).reshape(shape)


def _never(count: jax.Array) -> jax.Array:
    return jnp.zeros((), bool)


def _keep(masks, scores, count, key):
    return masks


_NO_SCORE = Criterion(lambda p: (), None, lambda st, p, g, k: ())


def fixed_masks(inner: optax.GradientTransformation,
                masks: PyTree) -> optax.GradientTransformationExtraArgs:
    """Trains the subnetwork given by ``masks`` (True = keep, ``None`` = not
    pruned); the masks never change. Pruned weights are exactly 0.0 after
    every step and ``inner`` never sees their gradients. This is how a lottery
    ticket is retrained (Frankle & Carbin 2019, "The Lottery Ticket
    Hypothesis: Finding Sparse, Trainable Neural Networks").

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([[1.0, 2.0]])}
    >>> tx = fixed_masks(optax.sgd(0.5), {"w": jnp.array([[True, False]])})
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.5, 0.0]]
    """
    where = jax.tree.map(lambda m: m is not None, masks, is_leaf=_is_none)

    def init_masks(params, selected, key):
        check_same_structure(params, masks, "params", "masks", b_none_ok=True)
        return masks

    rule = MaskRule(_NO_SCORE, _never, _keep, init_masks=init_masks)
    return pruned(inner, rule=rule, where=where)


def static_sparse(inner: optax.GradientTransformation, sparsity: Any, *,
                  distribution: Any = "erk", where: Where = None,
                  seed: int = 0, layer_axis: LayerAxis = None
                  ) -> optax.GradientTransformationExtraArgs:
    """Static sparse training: a random mask drawn at ``init`` with per-leaf
    sparsity from ``distribution`` (ERK by default) and never changed -- the
    "static" baseline of Evci et al. 2020 (RigL; Mocanu et al. 2018 for
    Erdős–Rényi masks).

    Args:
      inner: the optimizer to wrap.
      sparsity: overall fraction pruned (or ``{path_regex: sparsity}``).
      distribution: "erk", "uniform" or ``{path_regex: sparsity}``.
      where: which leaves are sparse (see ``jaxprune.tree``).
      seed: PRNG seed of the mask.
      layer_axis: stacked (scanned) layers, allocated per layer slice (as in
        ``jaxprune.masks.unstructured``).

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = static_sparse(optax.adam(1e-3), 0.75, distribution="uniform")
    >>> state = tx.init({"w": jnp.ones((4, 4))})
    >>> int(jaxprune.masks_of(state)["w"].sum())
    4
    """
    _check_overall(sparsity)

    def init_masks(params, selected, key):
        return random_masks(params, sparsity, key, distribution=distribution,
                            where=_selected_tree(params, selected), layer_axis=layer_axis)

    rule = MaskRule(_NO_SCORE, _never, _keep, init_masks=init_masks)
    return pruned(inner, rule=rule, where=resolve_where(where, layer_axis), seed=seed)


def _check_overall(sparsity: Any) -> None:
    if not isinstance(sparsity, Mapping):  # a mapping is checked by allocation
        allocation.check_sparsity(sparsity)


def _selected_tree(params: PyTree, selected: list) -> PyTree:
    return jax.tree.unflatten(jax.tree.structure(params), [bool(s) for s in selected])


def drop_and_grow(mask: jax.Array, drop_score: jax.Array, grow_score: jax.Array,
                  fraction: Union[float, jax.Array]) -> jax.Array:
    """One leaf's drop-and-grow mask update (Mocanu et al. 2018; Evci et al.
    2020): of the ``n`` active entries, the ``prune_count(fraction, n)`` with
    the lowest ``drop_score`` are dropped (NaN first), then as many entries
    with the highest ``grow_score`` among those inactive after the drop are
    grown (a dropped entry may be grown back; NaN grow scores last). The active count is unchanged; ties go to the
    earlier flat index. Works under ``jit`` with a traced ``fraction``.

    >>> import jax.numpy as jnp
    >>> mask = jnp.array([True, True, False, False])
    >>> w = jnp.array([0.1, 2.0, 0.0, 0.0])
    >>> g = jnp.array([0.0, 0.0, 0.5, 3.0])
    >>> drop_and_grow(mask, jnp.abs(w), jnp.abs(g), 0.5).tolist()
    [False, True, False, True]
    """
    allocation.check_sparsity(fraction, "fraction")
    n_active = jnp.sum(mask, dtype=jnp.int32)
    n_drop = threshold.prune_count(jnp.asarray(fraction, jnp.float32), n_active)
    # Inactive entries are protected: they rank above every active score.
    dropped = threshold.lowest([drop_score], n_drop, protected=[~mask])[0]
    kept = mask & ~dropped
    # Highest grow score = lowest negated score; entries still active are protected.
    # A NaN grow score (a NaN gradient) must not rank first: it is grown last.
    grow = grow_score.astype(jnp.float32)
    grow = jnp.where(jnp.isnan(grow), -jnp.inf, grow)
    grown = threshold.lowest([-grow], n_drop, protected=[kept])[0]
    return kept | grown


def _grouped_drop_and_grow(masks: PyTree, drop_scores: PyTree, grow_scores: PyTree,
                           frac: jax.Array, layer_axis: LayerAxis) -> PyTree:
    """``drop_and_grow`` on every masked leaf (every layer slice of a leaf
    with a layer axis), leaves of equal shape stacked and updated by one
    ``lax.map``: the program holds one drop-and-grow per distinct shape,
    not one per leaf (``jaxprune.leaf_groups``)."""
    items = [(p, m) for p, m in leaves_with_paths(masks, keep_none=True) if m is not None]
    axes = layer_axes(items, layer_axis)
    flat_masks, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    chosen = [i for i, m in enumerate(flat_masks) if m is not None]
    flat_drop = treedef.flatten_up_to(drop_scores)
    # drop_and_grow ranks grow scores as float32: cast first so that equal leaves stack.
    flat_grow = [jnp.asarray(g).astype(jnp.float32) if flat_masks[i] is not None else None
                 for i, g in enumerate(treedef.flatten_up_to(grow_scores))]

    def layers_first(xs):  # a stacked leaf is a stack of rows, one per layer
        return [xs[i] if a is None else jnp.moveaxis(xs[i], a, 0) for i, a in zip(chosen, axes)]

    ms, ds, gs = layers_first(flat_masks), layers_first(flat_drop), layers_first(flat_grow)
    rows = [a is not None for a in axes]
    parts, groups = [], leaf_groups.group_indices(ds, rows=rows)
    for g in groups:
        stacked = tuple(leaf_groups.stack(xs, g, rows) for xs in (ms, ds, gs))
        if stacked[0].shape[0] == 1:
            parts.append(drop_and_grow(*(x[0] for x in stacked), frac)[None])
        else:
            parts.append(lax.map(lambda t: drop_and_grow(*t, frac), stacked))
    out = list(flat_masks)
    for i, a, m in zip(chosen, axes, leaf_groups.unstack(parts, groups, len(ms), rows, like=ms)):
        out[i] = m if a is None else jnp.moveaxis(m, 0, a)
    return jax.tree.unflatten(treedef, out)


def _drop_fraction_fn(drop_fraction: DropFraction, end: Optional[int],
                      cosine: bool) -> Callable[[jax.Array], jax.Array]:
    if callable(drop_fraction):
        return drop_fraction
    allocation.check_sparsity(drop_fraction, "drop_fraction")
    if cosine:
        # alpha * (1 + cos(pi * t / end)) / 2, RigL's drop-fraction decay.
        return optax.cosine_decay_schedule(drop_fraction, end)
    return lambda t: jnp.full((), drop_fraction, jnp.float32)


def _update_steps(every: int, end: Optional[int]) -> Callable[[jax.Array], jax.Array]:
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if end is not None and (not isinstance(end, int) or end < 1):
        raise ValueError(f"end must be a positive int or None, got {end!r}")

    def is_update(t):
        # Step 0 is skipped: the random initial masks were just drawn.
        on = (t > 0) & (t % every == 0)
        return on if end is None else on & (t < end)
    return is_update


def _dynamic(inner, sparsity, every, end, drop_fraction, distribution, where, seed,
             grow: str, cosine: bool, layer_axis: LayerAxis = None
             ) -> optax.GradientTransformationExtraArgs:
    _check_overall(sparsity)
    fraction_at = _drop_fraction_fn(drop_fraction, end, cosine)

    if grow == "gradient":
        crit = Criterion(lambda p: (), None,
                         lambda st, p, g, k: (score_fns.magnitude(p), score_fns.magnitude(g)),
                         needs_grads=True)
    else:
        crit = Criterion(lambda p: (), None,
                         lambda st, p, g, k: (score_fns.magnitude(p), score_fns.random(p, k)))

    def update(masks, scores, count, key):
        frac = jnp.asarray(fraction_at(count), jnp.float32)
        drop_scores, grow_scores = scores
        return _grouped_drop_and_grow(masks, drop_scores, grow_scores, frac, layer_axis)

    def init_masks(params, selected, key):
        return random_masks(params, sparsity, key, distribution=distribution,
                            where=_selected_tree(params, selected), layer_axis=layer_axis)

    rule = MaskRule(crit, _update_steps(every, end), update, init_masks, grows=True)
    return pruned(inner, rule=rule, where=resolve_where(where, layer_axis), seed=seed)


def rigl(inner: optax.GradientTransformation, sparsity: Any, *, end: int, every: int = 100,
         drop_fraction: DropFraction = 0.3, distribution: Any = "erk", where: Where = None,
         seed: int = 0, layer_axis: LayerAxis = None) -> optax.GradientTransformationExtraArgs:
    """RigL dynamic sparse training (Evci et al. 2020, "Rigging the Lottery:
    Making All Tickets Winners", ICML).

    Masks start random with per-leaf sparsity from ``distribution`` (ERK by
    default). At steps ``t = every, 2 * every, ...`` with ``t < end`` each
    leaf drops ``round(f_t * n_active)`` of its active weights by magnitude,
    with ``f_t = drop_fraction * (1 + cos(pi * t / end)) / 2``, and grows as
    many inactive weights with the largest gradient magnitude ``|g|``
    (see ``drop_and_grow``). Grown weights start at exactly 0.0 with fresh
    optimizer state. Pass the dense gradient (that of the masked model, which
    is nonzero at pruned weights) as ``grads``.

    Args:
      inner: the optimizer to wrap (e.g. ``optax.sgd(0.1, momentum=0.9)``).
      sparsity: overall fraction pruned, or ``{path_regex: sparsity}``.
      end: last step (exclusive) of mask updates, e.g. 75% of training.
      every: mask-update period ``ΔT``.
      drop_fraction: ``α``, or a callable ``step -> fraction`` replacing the
        cosine decay.
      distribution: "erk", "uniform" or ``{path_regex: sparsity}``.
      where: which leaves are sparse (see ``jaxprune.tree``).
      seed: PRNG seed of the initial masks.
      layer_axis: stacked (scanned) layers, as in ``jaxprune.masks.unstructured``:
        allocation, active counts and drop-and-grow per layer slice.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      ``jaxprune.PrunedState``; ``jaxprune.masks_of(state)`` gives the masks.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = rigl(optax.adam(1e-3), 0.5, end=1000, distribution="uniform")
    >>> state = tx.init({"w": jnp.ones((4, 4))})
    >>> int(jaxprune.masks_of(state)["w"].sum())
    8
    """
    if not isinstance(end, int) or end < 1:
        raise ValueError(f"rigl needs end (the last mask-update step) > 0, got {end!r}")
    return _dynamic(inner, sparsity, every, end, drop_fraction, distribution, where, seed,
                    grow="gradient", cosine=True, layer_axis=layer_axis)


def sparse_evolutionary(inner: optax.GradientTransformation, sparsity: Any, *,
                        every: int = 100, end: Optional[int] = None,
                        drop_fraction: DropFraction = 0.3, distribution: Any = "erk",
                        where: Where = None, seed: int = 0,
                        layer_axis: LayerAxis = None) -> optax.GradientTransformationExtraArgs:
    """SET, sparse evolutionary training (Mocanu et al. 2018, "Scalable
    Training of Artificial Neural Networks with Adaptive Sparse Connectivity
    inspired by Network Science", Nature Communications).

    Every ``every`` steps (before ``end`` when given) each leaf drops the
    fraction ``ζ = drop_fraction`` of its smallest-magnitude active weights
    and regrows as many at random among the inactive ones; regrown weights
    start at exactly 0.0 with fresh optimizer state. The per-leaf active
    count never changes. Arguments as in ``rigl``; ``drop_fraction`` is
    constant unless a callable ``step -> fraction`` is given.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = sparse_evolutionary(optax.sgd(0.1), 0.5, every=1, distribution="uniform")
    >>> state = tx.init({"w": jnp.ones((4, 4))})
    >>> int(jaxprune.masks_of(state)["w"].sum())
    8
    """
    return _dynamic(inner, sparsity, every, end, drop_fraction, distribution, where, seed,
                    grow="random", cosine=False, layer_axis=layer_axis)


def ste(score: Any = score_fns.magnitude,
        sparsity: Union[float, SparsitySchedule, Callable] = 0.5, *,
        every: Optional[int] = 1, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """Tracks masks for straight-through-estimator (STE) training without
    touching the updates: the dense weights keep training and a pruned weight
    may come back at a later mask update (Zhou et al. 2021, "Learning N:M
    Fine-grained Structured Sparse Neural Networks From Scratch"; Bengio et
    al. 2013 for the estimator).

    Put it anywhere in an optax chain; ``optax.tree.get(state, "masks")`` (or
    ``jaxprune.masks_of(state)``) reads the masks, which the forward pass
    applies with ``ste_apply(params, masks)``. Masks are recomputed from the
    dense weights at every update step of the schedule (every step by
    default); before the first update they are dense. Arguments are those of
    ``jaxprune.prune`` (e.g. ``granularity="n_of_m"``, ``n=2``, ``m=4``).

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}
    >>> tx = optax.chain(optax.sgd(0.1), ste(sparsity=0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.tree.get(state, "masks")["w"].tolist()
    [[False, True], [True, False]]
    >>> updates["w"].tolist()  # unchanged: the dense weights keep training
    [[-0.10000000149011612, 0.30000001192092896], [-0.20000000298023224, -0.05000000074505806]]
    """
    where = kwargs.pop("where", None)
    seed = kwargs.pop("seed", 0)
    rule = kwargs.pop("rule", None) or schedule_rule(score, sparsity, every=every, regrow=True,
                                                     **kwargs)
    # The dense weights train by design: pruned entries are not zero, so only
    # the sparsity is checked, not the params.
    tracker = _prune(rule, where, seed, _Checks("jaxprune.ste", params=False, zeros=False))

    def update(updates, state, params=None, **extra):
        # prune's rewritten updates are discarded (dead code under jit).
        _, state = tracker.update(updates, state, params, **extra)
        return updates, state

    return optax.GradientTransformationExtraArgs(tracker.init, update)


def ste_apply(params: PyTree, masks: PyTree) -> PyTree:
    """Masked weights for the forward pass with a straight-through gradient:
    the value is ``where(mask, w, 0)``, and the gradient with respect to
    ``w`` is that of the masked model, passed unchanged to every dense
    weight, pruned ones included (Bengio et al. 2013; Zhou et al. 2021).
    A NaN or inf dense weight at a pruned position does not reach the
    forward pass. ``None`` mask leaves pass through.

    >>> import jax, jax.numpy as jnp
    >>> w = {"w": jnp.array([2.0, 3.0])}
    >>> m = {"w": jnp.array([True, False])}
    >>> ste_apply(w, m)["w"].tolist()
    [2.0, 0.0]
    >>> jax.grad(lambda p: jnp.sum(ste_apply(p, m)["w"] * jnp.array([5.0, 7.0])))(w)["w"].tolist()
    [5.0, 7.0]
    """
    check_same_structure(params, masks, "params", "masks", b_none_ok=True)
    for path, m in leaves_with_paths(masks):
        if not is_mask_leaf(m):
            raise TypeError(f"masks must hold bool arrays or None; '{path}' has "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
    return jax.tree.map(lambda m, w: w if m is None else _straight_through(m, w),
                        masks, params, is_leaf=_is_none)


@jax.custom_jvp
def _straight_through(mask: jax.Array, w: jax.Array) -> jax.Array:
    # Not w + stop_gradient(masked - w): that is NaN wherever w is, pruned or not.
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    mask, w = primals
    _, w_dot = tangents
    return _straight_through(mask, w), w_dot
