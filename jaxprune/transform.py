"""Pruning as optax gradient transformations.

``prune(...)`` goes last in an optax chain. It keeps a mask per selected
parameter in its state, moves it along a sparsity schedule inside ``jit``
(``lax.cond`` on the step: nothing is computed on other steps) and rewrites
the final updates so that ``optax.apply_updates`` lands every pruned weight on
exactly 0.0 -- ``u' = where(mask, u, -p)`` -- with no post-update call.

``pruned(inner, ...)`` wraps an optimizer instead: gradients of pruned
weights are zeroed before ``inner`` sees them (so its moments stay 0 there),
the inner state of every weight whose mask changes is reset, and the final
updates are rewritten as above. Sparse-training algorithms (RigL, SET) are
``pruned`` with another ``MaskRule``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxprune import masks as mask_fns
from jaxprune import scores as score_fns
from jaxprune.criteria import Criterion, criterion
from jaxprune.schedules import SparsitySchedule, as_schedule
from jaxprune.tree import Where, check_same_structure, select

PyTree = Any

__all__ = ["STATIC_ARGS", "PruneState", "PrunedState", "MaskRule", "schedule_rule", "prune", "pruned",
           "masks_of", "sparsity_of"]


#: Arguments of ``prune`` that ``optax.inject_hyperparams`` must leave alone
#: (it would turn callables into schedules and numbers into traced arrays):
#: ``optax.inject_hyperparams(jaxprune.prune, static_args=jaxprune.STATIC_ARGS)``.
STATIC_ARGS = ("score", "where", "min_density", "n", "m", "every", "seed", "rule")


class PruneState(NamedTuple):
    """State of ``prune``: step count, masks (None for unselected leaves),
    criterion statistics and the PRNG key of random criteria."""

    count: jax.Array
    masks: PyTree
    stats: PyTree
    key: jax.Array


class PrunedState(NamedTuple):
    """State of ``pruned``: the wrapped optimizer's state and the pruning state."""

    inner_state: optax.OptState
    prune_state: PruneState


class MaskRule(NamedTuple):
    """What a pruning transformation does with masks.

    Attributes:
      criterion: how scores are computed (see ``jaxprune.criteria``).
      is_update_step: ``count -> bool`` (jit-safe).
      update: ``(masks, scores, count, key) -> masks``, run only on update
        steps; ``masks`` are the current masks.
      init_masks: ``(params, selected, key) -> masks`` or None for dense.
      grows: masks may regrow pruned entries (drives optimizer-state resets).
      scores_from_params: ``update`` receives the params in place of the
        scores and applies ``criterion.elementwise`` itself (inside its
        threshold passes, so the scores are never stored).
    """

    criterion: Criterion
    is_update_step: Callable[[jax.Array], jax.Array]
    update: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]
    init_masks: Optional[Callable[[PyTree, PyTree, jax.Array], PyTree]] = None
    grows: bool = False
    scores_from_params: bool = False


def _mask_fn(granularity: str, scope: str, where_tree, distribution, normalize,
             min_density, n, m, axis, block_shape, reduce):
    if granularity == "unstructured":
        return lambda sc, s: mask_fns.unstructured(
            sc, s, scope=scope, where=where_tree, distribution=distribution,
            normalize=normalize, min_density=min_density)
    if granularity == "n_of_m":
        return lambda sc, s: mask_fns.n_of_m(sc, n, m, -1 if axis is None else axis, where_tree)
    if granularity == "block":
        return lambda sc, s: mask_fns.block(sc, s, block_shape, reduce or "mean", where_tree,
                                            scope=scope)
    if granularity == "channels":
        return lambda sc, s: mask_fns.channels(
            sc, s, -1 if axis is None else axis, where_tree, scope=scope,
            reduce=reduce or "mean", normalize=normalize, min_density=min_density)
    raise ValueError("granularity must be 'unstructured', 'n_of_m', 'block' or 'channels', "
                     f"got {granularity!r}")


def schedule_rule(score: Any = score_fns.magnitude,
                  sparsity: Union[float, SparsitySchedule, Callable] = 0.5, *,
                  scope: str = "local", where: Where = None, granularity: str = "unstructured",
                  distribution: Any = "uniform", normalize: Optional[str] = None,
                  min_density: float = 0.0, n: int = 2, m: int = 4, axis: Optional[int] = None,
                  block_shape: tuple = (4, 4), reduce: Optional[str] = None,
                  every: Optional[int] = None, regrow: bool = False) -> MaskRule:
    """The ``MaskRule`` of ``prune``: at each update step of the schedule,
    masks from the pure core at the schedule's sparsity. Arguments as in
    ``prune``."""
    sched = as_schedule(sparsity, every)
    crit = criterion(score)
    fused = crit.elementwise  # e.g. |w|: computed inside the threshold passes

    def update(masks, scores, count, key):
        # With ``fused`` set, ``scores`` are the params (scores_from_params).
        where_tree = jax.tree.map(lambda mk: mk is not None, masks,
                                  is_leaf=lambda x: x is None)
        if not regrow and granularity == "unstructured":
            # Pruned entries rank lowest, so masks nest as sparsity grows.
            return mask_fns._unstructured(scores, sched(count), scope, where_tree, distribution,
                                          normalize, min_density, kept=masks,
                                          elementwise=fused)
        if fused is not None:
            scores = jax.tree.map(fused, scores)
        if not regrow:
            scores = jax.tree.map(
                lambda s, mk: s if mk is None else jnp.where(mk, s, jnp.nan),
                scores, masks, is_leaf=lambda x: x is None)
        fn = _mask_fn(granularity, scope, where_tree, distribution, normalize, min_density,
                      n, m, axis, block_shape, reduce)
        return fn(scores, sched(count))

    # Validate options eagerly (on a dummy) so that mistakes surface at construction.
    _mask_fn(granularity, scope, None, distribution, normalize, min_density, n, m, axis,
             block_shape, reduce)
    return MaskRule(crit, sched.is_update_step, update, grows=regrow,
                    scores_from_params=fused is not None)


def _dense_masks(params: PyTree, where: Where) -> PyTree:
    chosen = select(params, where)
    leaves, treedef = jax.tree.flatten(params)
    # ones_like keeps each parameter's sharding (jnp.ones would not).
    return jax.tree.unflatten(
        treedef, [jnp.ones_like(x, dtype=bool) if c else None for x, c in zip(leaves, chosen)])


def _check_params(params: PyTree, masks: PyTree, who: str) -> None:
    if params is None:
        raise ValueError(f"{who} needs the current params: call "
                         "tx.update(grads, opt_state, params)")
    try:
        check_same_structure(params, masks, "params", "pruning masks in the optimizer state",
                             b_none_ok=True)
    except ValueError as e:
        raise ValueError(f"{e}. The optimizer state was built for a different model; "
                         "re-run tx.init(params) for this one.") from None


def _rewrite_updates(updates: PyTree, masks: PyTree, params: PyTree) -> PyTree:
    """``where(mask, u, -p)``: after ``p + u`` a pruned weight is exactly 0."""
    def one(mk, u, p):
        if mk is None:
            return u
        return jnp.where(mk, u, -jnp.asarray(p).astype(u.dtype))
    return jax.tree.map(one, masks, updates, params, is_leaf=lambda x: x is None)


def _init_state(rule: MaskRule, where: Where, params: PyTree, seed: int) -> PruneState:
    key = jax.random.key(seed)
    masks = (_dense_masks(params, where) if rule.init_masks is None
             else rule.init_masks(params, select(params, where), key))
    return PruneState(jnp.zeros((), jnp.int32), masks, rule.criterion.init(params), key)


def _step_masks(rule: MaskRule, state: PruneState, params: PyTree, grads: PyTree):
    """Folds this step into the statistics and, on update steps, new masks.
    Returns (is_update, new masks, new stats)."""
    crit = rule.criterion
    stats = state.stats
    if crit.accumulate is not None:
        stats = crit.accumulate(stats, params, grads)
    is_update = rule.is_update_step(state.count)

    def do_update():
        key = jax.random.fold_in(state.key, state.count)
        scores = params if rule.scores_from_params else crit.score(stats, params, grads, key)
        new = rule.update(state.masks, scores, state.count, key)
        new_stats = crit.init(params) if crit.reset_after_update else stats
        return new, new_stats

    masks, stats = lax.cond(is_update, do_update, lambda: (state.masks, stats))
    return is_update, masks, stats


def _build_rule(rule, score, sparsity, kwargs):
    return rule if rule is not None else schedule_rule(score, sparsity, **kwargs)


def prune(score: Any = score_fns.magnitude,
          sparsity: Union[float, SparsitySchedule, Callable] = 0.5, *,
          scope: str = "local", where: Where = None, granularity: str = "unstructured",
          distribution: Any = "uniform", normalize: Optional[str] = None,
          min_density: float = 0.0, n: int = 2, m: int = 4, axis: Optional[int] = None,
          block_shape: tuple = (4, 4), reduce: Optional[str] = None,
          every: Optional[int] = None, regrow: bool = False, seed: int = 0,
          rule: Optional[MaskRule] = None) -> optax.GradientTransformationExtraArgs:
    """Prunes during training: an optax transformation for the end of a chain.

    Magnitude pruning (Han et al. 2015) along a gradual schedule (Zhu & Gupta
    2017) is ``prune(score=jaxprune.scores.magnitude,
    sparsity=jaxprune.schedules.polynomial(0.9, begin=100, end=1000, every=50))``.

    It must be the LAST element of the chain: it rewrites the final updates
    ``u`` to ``where(mask, u, -params)`` so that ``optax.apply_updates`` sets
    pruned weights to exactly 0.0 on every step, whatever the optimizer
    (sgd, momentum, adam/adamw with weight decay, lion, adafactor,
    ``optax.MultiSteps`` around the chain). A transformation after it would
    change the updates again and break that; use ``pruned(inner)`` to wrap an
    optimizer instead when the chain cannot end with ``prune``.

    Args:
      score: a ``jaxprune.scores`` function, a ``Criterion``, or any
        ``f(params)`` / ``f(params, grads)``. Gradient criteria need the raw
        gradients: pass them as an extra argument,
        ``tx.update(grads, state, params, grads=grads)``, or use ``pruned``.
      sparsity: a float (masks set at step 0), a ``jaxprune.schedules``
        schedule, or any optax schedule ``step -> sparsity``.
      scope, where, distribution, normalize, min_density: as in
        ``jaxprune.masks.unstructured``.
      granularity: "unstructured", "n_of_m" (uses ``n``, ``m``, ``axis``),
        "block" (``block_shape``, ``reduce``) or "channels" (``axis``,
        ``reduce``).
      every: mask-update period for a float or plain-callable sparsity.
      regrow: let a mask update revive pruned entries (default: pruned
        entries rank lowest, so masks only shrink and nest).
      seed: PRNG seed of the random criterion.
      rule: a custom ``MaskRule`` (overrides the schedule arguments).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      ``PruneState``; ``optax.tree.get(state, "masks")`` returns the masks.
      To change the sparsity by hand during training, use
      ``optax.inject_hyperparams(jaxprune.prune, static_args=jaxprune.STATIC_ARGS)``
      and set ``state.hyperparams["sparsity"]``.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
    >>> tx = optax.chain(optax.sgd(0.1), jaxprune.prune(sparsity=0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, 0.0], [2.700000047683716, -3.5999999046325684]]
    """
    rule = _build_rule(rule, score, sparsity, dict(
        scope=scope, granularity=granularity, distribution=distribution, normalize=normalize,
        min_density=min_density, n=n, m=m, axis=axis, block_shape=block_shape, reduce=reduce,
        every=every, regrow=regrow))

    def init(params):
        return _init_state(rule, where, params, seed)

    def update(updates, state, params=None, **extra):
        _check_params(params, state.masks, "jaxprune.prune")
        grads = extra.get("grads")
        if rule.criterion.needs_grads and grads is None:
            raise ValueError(
                "this score needs gradients, but jaxprune.prune (last in the chain) only sees "
                "the final updates: call tx.update(grads, state, params, grads=grads), or "
                "wrap the optimizer with jaxprune.pruned(inner_tx, score=...)")
        _, masks, stats = _step_masks(rule, state, params, grads)
        return (_rewrite_updates(updates, masks, params),
                PruneState(state.count + 1, masks, stats, state.key))

    return optax.GradientTransformationExtraArgs(init, update)


def _reset_inner(inner: optax.GradientTransformation, inner_state, changed: PyTree):
    """Zeroes the inner optimizer state of every entry whose mask changed."""
    def reset(x, c):
        if not hasattr(x, "shape") or c is None or jnp.shape(x) != jnp.shape(c):
            return x
        return jnp.where(c, jnp.zeros((), x.dtype), x)
    return optax.tree_utils.tree_map_params(inner, reset, inner_state, changed,
                                            is_leaf=lambda x: x is None)


def pruned(inner: optax.GradientTransformation, score: Any = score_fns.magnitude,
           sparsity: Union[float, SparsitySchedule, Callable] = 0.5, *,
           where: Where = None, seed: int = 0, rule: Optional[MaskRule] = None,
           **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that it trains a pruned model and keeps its own
    state sparse.

    Gradients of pruned weights are zeroed before ``inner`` sees them, the
    ``inner`` state (e.g. Adam moments) of every weight whose mask changes is
    reset to zero (a regrown weight starts fresh), and the final updates are
    rewritten like ``prune``'s so pruned weights stay exactly 0.0. Gradient
    criteria (saliency, Taylor, movement, Fisher) see the raw gradients.
    Keyword arguments are those of ``prune``.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = jaxprune.pruned(optax.adam(1e-2), sparsity=0.5)
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, 0.0], [2.990000009536743, -3.990000009536743]]
    """
    rule = _build_rule(rule, score, sparsity, kwargs)

    def init(params):
        return PrunedState(inner.init(params), _init_state(rule, where, params, seed))

    def update(grads, state, params=None, **extra):
        ps = state.prune_state
        _check_params(params, ps.masks, "jaxprune.pruned")
        is_update, masks, stats = _step_masks(rule, ps, params, grads)

        def reset(inner_state):
            changed = jax.tree.map(lambda new, old: None if new is None else new != old,
                                   masks, ps.masks, is_leaf=lambda x: x is None)
            return _reset_inner(inner, inner_state, changed)

        inner_state = lax.cond(is_update, reset, lambda s: s, state.inner_state)
        stepping = masks
        if rule.grows:
            # A weight grown at this update enters at exactly 0.0 with zeroed state and
            # moves from the next step on (RigL steps with the old mask, then regrows).
            stepping = jax.tree.map(lambda new, old: None if new is None else new & old,
                                    masks, ps.masks, is_leaf=lambda x: x is None)
        masked_grads = jax.tree.map(
            lambda mk, g: g if mk is None else jnp.where(mk, g, jnp.zeros((), g.dtype)),
            stepping, grads, is_leaf=lambda x: x is None)
        updates, inner_state = inner.update(masked_grads, inner_state, params, **extra)
        return (_rewrite_updates(updates, stepping, params),
                PrunedState(inner_state, PruneState(ps.count + 1, masks, stats, ps.key)))

    return optax.GradientTransformationExtraArgs(init, update)


def masks_of(state: optax.OptState) -> PyTree:
    """The masks held anywhere in an optimizer state (``optax.tree.get``)."""
    found = optax.tree_utils.tree_get(state, "masks")
    if found is None:
        raise ValueError("no jaxprune masks in this optimizer state")
    return found


def sparsity_of(state: optax.OptState) -> jax.Array:
    """Current sparsity of the masks in an optimizer state."""
    from jaxprune.apply import sparsity
    return sparsity(masks_of(state))

