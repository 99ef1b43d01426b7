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

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import allocation, collapse_guard, diagnostics, leaf_groups, threshold
from jaxprune import masks as mask_fns
from jaxprune import scores as score_fns
from jaxprune.criteria import Criterion, criterion
from jaxprune.schedules import SparsitySchedule, as_schedule
from jaxprune.tree import (LayerAxis, Where, check_same_structure, leaves_with_paths, resolve_where,
                           select)

PyTree = Any

__all__ = ["STATIC_ARGS", "PruneState", "PrunedState", "MaskRule", "schedule_rule", "prune", "pruned",
           "masks_of", "sparsity_of"]


#: Arguments of ``prune`` that ``optax.inject_hyperparams`` must leave alone
#: (it would turn callables into schedules and numbers into traced arrays):
#: ``optax.inject_hyperparams(jaxprune.prune, static_args=jaxprune.STATIC_ARGS)``.
STATIC_ARGS = ("score", "where", "min_density", "n", "m", "axis", "every", "seed", "rule", "signed",
               "layer_axis")


class PruneState(NamedTuple):
    """State of ``prune``: step count, masks (None for unselected leaves),
    criterion statistics and the PRNG key of random criteria, plus:

    Attributes:
      sparsity: the sparsity the current masks were built for (0.0 before
        the first mask update).
      last_update: the step of the last mask update (-1: none yet, 0 for
        masks drawn at ``init``).
      refused: how many mask updates were refused because the requested
        sparsity was outside [0, 1] or NaN (the masks were kept as they were).
      alerts: ``jaxprune.diagnostics.Alerts``, per-leaf flags of what the
        checks found; ``jaxprune.check(opt_state)`` turns them (and
        ``refused``) into ``PruningWarning`` warnings.
    """

    count: jax.Array
    masks: PyTree
    stats: PyTree
    key: jax.Array
    sparsity: jax.Array = None
    last_update: jax.Array = None
    refused: jax.Array = None
    alerts: Optional[diagnostics.Alerts] = None


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
      target: ``count -> sparsity`` requested at that step, or None. A value
        outside [0, 1] (or NaN) on an update step is refused: the masks are
        kept and ``PruneState.refused`` counts it.
      follows_changes: masks are also updated whenever ``target`` differs
        from the sparsity of the current masks (a sparsity set by hand
        through ``optax.inject_hyperparams``).
      reports: ``update`` returns ``(masks, findings)``, findings a dict
        ``kind -> flags`` of ``jaxprune.diagnostics`` checks ("collapse",
        "negative": one flag per masked leaf; "short": one), stored in
        ``PruneState.alerts``.
      update_stacked: optional ``(masks, params, groups, paths, shapes, count)
        -> (masks, findings)`` on stacks of equal leaves
        (``jaxprune.leaf_groups``: part ``p`` stacks the masked leaves
        ``groups[p]``, flattened on one device; ``paths`` and ``shapes``
        name and shape every masked leaf). When set (with ``scores_from_params``), the
        transformation stacks params and masks once per mask update and its
        checks and this update share the stacks: the traced program gets
        fewer per-leaf kernels. Must give the masks ``update`` gives.
    """

    criterion: Criterion
    is_update_step: Callable[[jax.Array], jax.Array]
    update: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]
    init_masks: Optional[Callable[[PyTree, PyTree, jax.Array], PyTree]] = None
    grows: bool = False
    scores_from_params: bool = False
    target: Optional[Callable[[jax.Array], jax.Array]] = None
    follows_changes: bool = False
    reports: bool = False
    update_stacked: Optional[Callable] = None


def _mask_fn(granularity: str, scope: str, where_tree, distribution, normalize,
             min_density, n, m, axis, block_shape, reduce, signed=False, reporter=None,
             layer_axis=None):
    if granularity not in ("unstructured", "n_of_m", "block", "channels"):
        raise ValueError("granularity must be 'unstructured', 'n_of_m', 'block' or 'channels', "
                         f"got {granularity!r}")
    if layer_axis is not None and granularity in ("block", "channels"):
        raise ValueError(f"layer_axis applies to granularity 'unstructured' and 'n_of_m'; "
                         f"granularity={granularity!r} would rank the stacked layers together")
    mask_fns.check_options(scope, normalize, min_density)
    if granularity in ("n_of_m", "block") and (normalize is not None or min_density):
        raise ValueError(f"normalize and min_density act on unstructured or channel rankings; "
                         f"granularity={granularity!r} would ignore them")
    if granularity == "unstructured":
        return lambda sc, s: mask_fns._unstructured(
            sc, s, scope, where_tree, distribution, normalize, min_density,
            signed=signed, reporter=reporter, layer_axis=layer_axis)
    if granularity == "n_of_m":
        return lambda sc, s: mask_fns._n_of_m(sc, n, m, axis, where_tree, signed, reporter,
                                              layer_axis)
    if granularity == "block":
        return lambda sc, s: mask_fns._block(sc, s, block_shape, reduce or "mean", where_tree,
                                             scope, signed, reporter)
    return lambda sc, s: mask_fns._channels(
        sc, s, -1 if axis is None else axis, where_tree, scope, reduce or "mean", normalize,
        min_density, signed, reporter)


def schedule_rule(score: Any = score_fns.magnitude,
                  sparsity: Union[float, SparsitySchedule, Callable] = 0.5, *,
                  scope: str = "local", where: Where = None, granularity: str = "unstructured",
                  distribution: Any = "uniform", normalize: Optional[str] = None,
                  min_density: Optional[float] = None, n: int = 2, m: int = 4,
                  axis: Optional[int] = None, block_shape: tuple = (4, 4),
                  reduce: Optional[str] = None, every: Optional[int] = None,
                  regrow: bool = False, signed: bool = False,
                  layer_axis: LayerAxis = None) -> MaskRule:
    """The ``MaskRule`` of ``prune``: at each update step of the schedule,
    masks from the pure core at the schedule's sparsity. Arguments as in
    ``prune``. A plain number (or array) as ``sparsity`` without ``every``
    is followed when it changes, so a value set through
    ``optax.inject_hyperparams`` takes effect at the next step."""
    follows_changes = (not callable(sparsity) and not isinstance(sparsity, SparsitySchedule)
                       and every is None)
    sched = as_schedule(sparsity, every)
    crit = criterion(score)
    fused = crit.elementwise  # e.g. |w|: computed inside the threshold passes
    # Magnitudes cannot be negative; movement scores are signed on purpose.
    signed = signed or crit.signed or fused is jnp.abs

    def update(masks, scores, count, key):
        # What the mask functions find goes to the state, not to a host callback
        # (the transformation refused out-of-range sparsities before this).
        reporter = diagnostics.Reporter(collect=True, sparsity_valid=True)
        # With ``fused`` set, ``scores`` are the params (scores_from_params).
        where_tree = jax.tree.map(lambda mk: mk is not None, masks,
                                  is_leaf=lambda x: x is None)
        if not regrow and granularity == "unstructured":
            # Pruned entries rank lowest, so masks nest as sparsity grows.
            new = mask_fns._unstructured(scores, sched(count), scope, where_tree, distribution,
                                         normalize, min_density, kept=masks,
                                         elementwise=fused, signed=signed, reporter=reporter,
                                         layer_axis=layer_axis)
            return new, reporter.found
        if fused is not None:
            scores = jax.tree.map(fused, scores)
        if not regrow:
            scores = jax.tree.map(
                lambda s, mk: s if mk is None else jnp.where(mk, s, jnp.nan),
                scores, masks, is_leaf=lambda x: x is None)
        fn = _mask_fn(granularity, scope, where_tree, distribution, normalize, min_density,
                      n, m, axis, block_shape, reduce, signed, reporter, layer_axis)
        return fn(scores, sched(count)), reporter.found

    def update_stacked(masks, params, groups, paths, shapes, count):
        # The same masks as ``update`` (local scope, nested masks, |w| fused),
        # on stacks the transformation built once for its checks too.
        if scope == "global":  # one ranking with the default layer-collapse guard
            return collapse_guard.guarded_stacked(params, masks, groups, sched(count), fused)
        per_leaf = allocation.allocate(sched(count), distribution, paths, shapes)
        counts = threshold.prune_count_vector(per_leaf, [int(np.prod(v)) for v in shapes])
        return threshold.select_stacked_rows(
            params, masks, [counts[np.asarray(g)] for g in groups], elementwise=fused,
            keep=True), {}

    stackable = (granularity == "unstructured" and not regrow and layer_axis is None
                 and fused is jnp.abs and normalize is None and min_density is None
                 and (scope == "local" or (distribution == "uniform"
                                           and not isinstance(sparsity, Mapping))))
    # Validate options eagerly so that mistakes surface at construction.
    _mask_fn(granularity, scope, None, distribution, normalize, min_density, n, m, axis,
             block_shape, reduce, layer_axis=layer_axis)
    return MaskRule(crit, sched.is_update_step, update, grows=regrow,
                    scores_from_params=fused is not None, target=sched,
                    follows_changes=follows_changes, reports=True,
                    update_stacked=update_stacked if stackable else None)


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


def _n_masked(masks: PyTree) -> int:
    return sum(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None))


def _init_state(rule: MaskRule, where: Where, params: PyTree, seed: int) -> PruneState:
    key = jax.random.key(seed)
    masks = (_dense_masks(params, where) if rule.init_masks is None
             else rule.init_masks(params, select(params, where), key))
    # Masks drawn at init are applied by step 0: step 1 is the first to check them.
    last = -1 if rule.init_masks is None else 0
    return PruneState(jnp.zeros((), jnp.int32), masks, rule.criterion.init(params), key,
                      jnp.zeros((), jnp.float32), jnp.asarray(last, jnp.int32),
                      jnp.zeros((), jnp.int32), diagnostics.Alerts.none(_n_masked(masks)))


class _Checks(NamedTuple):
    """What a transformation checks on the steps that update masks and on
    the step after each update (``who`` names it in the messages)."""

    who: str
    params: bool = True     # non-finite weights at pruned positions
    zeros: bool = True      # pruned weights arrive at exactly 0 (the chain order)


def _check_codes(checks: _Checks, mk: jax.Array, p: jax.Array, first_axis: int = 0) -> jax.Array:
    """Bit 1: a non-finite weight at a pruned position, bit 0: a finite but
    nonzero one, OR-reduced to one byte over the axes from ``first_axis``
    on: one reduction for both flags."""
    bits = jnp.where(jnp.isfinite(p),
                     (p != 0).astype(jnp.uint8) if checks.zeros else jnp.uint8(0), jnp.uint8(2))
    return jnp.max(jnp.where(mk, jnp.uint8(0), bits), axis=tuple(range(first_axis, p.ndim)))


def _flags(checks: _Checks, found: jax.Array, check_step) -> tuple[jax.Array, jax.Array]:
    nonfinite = (found & 2) != 0
    if not checks.zeros:
        return nonfinite, jnp.zeros_like(nonfinite)
    return nonfinite, ((found & 1) != 0) & check_step


def _param_checks(checks: _Checks, params, masks, check_step) -> tuple[jax.Array, jax.Array]:
    """Per-leaf flags under the current masks, read where the update step
    reads the params anyway: non-finite weights at pruned positions (no
    update can zero them; a weight pruned at this update is seen on the
    step after it, which is checked too), and nonzero pruned weights one
    step after an update (something after the transformation changed its
    updates)."""
    pairs = [(mk, p) for mk, p in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None),
                                      jax.tree.leaves(params)) if mk is not None]
    off = jnp.zeros(len(pairs), bool)
    if not pairs or not checks.params:
        return off, off
    return _flags(checks, jnp.stack([_check_codes(checks, mk, p) for mk, p in pairs]), check_step)


def _stacked_param_checks(checks: _Checks, params: list, masks: list, groups, n: int,
                          check_step) -> tuple[jax.Array, jax.Array]:
    """``_param_checks`` on stacks of equal leaves: one reduction per stack,
    flags returned in leaf order."""
    off = jnp.zeros(n, bool)
    if not n or not checks.params:
        return off, off
    order = np.argsort(np.concatenate([np.asarray(g) for g in groups]), kind="stable")
    found = jnp.concatenate([_check_codes(checks, mk, p, first_axis=1)
                             for mk, p in zip(masks, params)])
    return _flags(checks, found[order], check_step)


def _step_masks(rule: MaskRule, state: PruneState, params: PyTree, grads: PyTree,
                checks: _Checks):
    """Folds this step into the statistics and, on update steps, new masks.
    Returns (is_update, new masks, new stats, the state's bookkeeping fields).

    One ``lax.cond`` decides whether anything beyond the statistics runs:
    on mask-update steps and on the step after each update (where the
    checks read params and masks); every other step takes the empty branch.
    Nothing here calls back to the host, so the jitted step keeps JAX's
    fast dispatch path.
    """
    crit = rule.criterion
    stats = state.stats
    if crit.accumulate is not None:
        stats = crit.accumulate(stats, params, grads)
    count = state.count
    is_update = rule.is_update_step(count)
    if rule.target is not None:
        requested = jnp.asarray(rule.target(count), jnp.float32)
        if rule.follows_changes:
            is_update = is_update | (requested != state.sparsity)
        valid = (requested >= 0.0) & (requested <= 1.0)  # False for NaN
    else:
        requested, valid = state.sparsity, jnp.asarray(True)
    apply = is_update & valid
    check_step = count == state.last_update + 1
    none = diagnostics.Alerts.none(_n_masked(state.masks))

    def found(nonfinite, nonzero, from_rule):
        return none._replace(nonfinite=nonfinite, nonzero=nonzero, **{
            k: jnp.asarray(v, bool).reshape(getattr(none, k).shape)
            for k, v in from_rule.items() if k in none._fields})

    def do_update():
        key = jax.random.fold_in(state.key, count)
        scores = params if rule.scores_from_params else crit.score(stats, params, grads, key)
        new = rule.update(state.masks, scores, count, key)
        new, from_rule = new if rule.reports else (new, {})
        new_stats = crit.init(params) if crit.reset_after_update else stats
        return new, new_stats, from_rule

    def checked(branch, flags):
        def run():
            masks, new_stats, from_rule = branch()
            return masks, new_stats, dict(
                sparsity=jnp.where(apply, requested, state.sparsity),
                last_update=jnp.where(apply, count, state.last_update),
                refused=state.refused + (is_update & ~valid).astype(jnp.int32),
                alerts=state.alerts.merge(found(*flags, from_rule)))
        return run

    def update_or_check():
        if rule.update_stacked is not None and rule.scores_from_params and _n_masked(state.masks):
            return update_or_check_stacked()
        # Read once, before either branch: one copy of the checks in the program.
        flags = _param_checks(checks, params, state.masks, check_step)
        return lax.cond(apply, checked(do_update, flags),
                        checked(lambda: (state.masks, stats, {}), flags))

    def update_or_check_stacked():
        # Params and masks are stacked once; checks and selection share the stacks.
        flat_masks, treedef = jax.tree.flatten(state.masks, is_leaf=lambda x: x is None)
        picked = [(path, mk) for path, mk in leaves_with_paths(state.masks, keep_none=True)
                  if mk is not None]
        at = [i for i, mk in enumerate(flat_masks) if mk is not None]
        flat_params = treedef.flatten_up_to(params)
        ps, ms = [flat_params[i] for i in at], [flat_masks[i] for i in at]
        groups = leaf_groups.group_indices(ps, ms)
        P = [leaf_groups.stack(ps, g) for g in groups]
        K = [leaf_groups.stack(ms, g) for g in groups]
        flags = _stacked_param_checks(checks, P, K, groups, len(ps), check_step)

        def stacked_update():
            new, from_rule = rule.update_stacked(K, P, groups, [path for path, _ in picked],
                                                 [tuple(jnp.shape(p)) for p in ps], count)
            new_stats = crit.init(params) if crit.reset_after_update else stats
            return new, new_stats, from_rule

        new, new_stats, bookkeeping = lax.cond(apply, checked(stacked_update, flags),
                                               checked(lambda: (K, stats, {}), flags))
        out = list(flat_masks)
        for i, mk in zip(at, leaf_groups.unstack(new, groups, len(ps), like=ms)):
            out[i] = mk
        return jax.tree.unflatten(treedef, out), new_stats, bookkeeping

    def ordinary():  # the bookkeeping passes through untouched
        return state.masks, stats, dict(sparsity=state.sparsity, last_update=state.last_update,
                                        refused=state.refused, alerts=state.alerts)

    masks, stats, bookkeeping = lax.cond(is_update | check_step, update_or_check, ordinary)
    return apply, masks, stats, bookkeeping


def _build_rule(rule, score, sparsity, kwargs):
    return rule if rule is not None else schedule_rule(score, sparsity, **kwargs)


def prune(score: Any = score_fns.magnitude,
          sparsity: Union[float, SparsitySchedule, Callable] = 0.5, *,
          scope: str = "local", where: Where = None, granularity: str = "unstructured",
          distribution: Any = "uniform", normalize: Optional[str] = None,
          min_density: Optional[float] = None, n: int = 2, m: int = 4,
          axis: Optional[int] = None, block_shape: tuple = (4, 4), reduce: Optional[str] = None,
          every: Optional[int] = None, regrow: bool = False, seed: int = 0,
          signed: bool = False, rule: Optional[MaskRule] = None,
          layer_axis: LayerAxis = None) -> optax.GradientTransformationExtraArgs:
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

    Checks, recorded per leaf in ``PruneState.alerts`` and issued as
    ``jaxprune.PruningWarning`` by ``jaxprune.check(opt_state)`` (and by
    ``masks_of`` / ``sparsity_of``): on the step after every mask update,
    pruned weights that arrive nonzero (the chain order is wrong); then and
    on update steps, NaN/inf weights at pruned positions (no update can zero
    them: ``jaxprune.apply_masks`` does); the global-scope layer-collapse
    guard acting; negative scores. They run inside the mask-update
    ``lax.cond``, so ordinary steps cost only the fused ``where``, and no
    host callback enters the step (it would slow every step's dispatch).

    Args:
      score: a ``jaxprune.scores`` function, a ``Criterion``, or any
        ``f(params)`` / ``f(params, grads)``. Gradient criteria need the raw
        gradients: pass them as an extra argument,
        ``tx.update(grads, state, params, grads=grads)``, or use ``pruned``.
      sparsity: a float (masks set at step 0, and again at the next step
        whenever it is changed through ``optax.inject_hyperparams``), a
        ``jaxprune.schedules`` schedule, or any optax schedule
        ``step -> sparsity``. A value outside [0, 1] at an update step is
        refused: the masks stay, ``PruneState.refused`` counts it, and
        ``jaxprune.check`` warns.
      scope, where, distribution, normalize, min_density, signed, layer_axis: as in
        ``jaxprune.masks.unstructured`` (``layer_axis`` also sets N:M's default axis
        per layer slice) (global scope has the same default
        layer-collapse guard).
      granularity: "unstructured", "n_of_m" (uses ``n``, ``m``, ``axis``;
        default axis: the kernel's reduction axis), "block"
        (``block_shape``, ``reduce``) or "channels" (``axis``, ``reduce``).
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
      and set ``state.hyperparams["sparsity"]``: the masks follow at the
      next step (with ``every=k``, at the next multiple of ``k``).

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
        every=every, regrow=regrow, signed=signed, layer_axis=layer_axis))
    return _prune(rule, resolve_where(where, layer_axis), seed, _Checks("jaxprune.prune"))


def _prune(rule: MaskRule, where: Where, seed: int, checks: _Checks
           ) -> optax.GradientTransformationExtraArgs:
    def init(params):
        return _init_state(rule, where, params, seed)

    def update(updates, state, params=None, **extra):
        _check_params(params, state.masks, checks.who)
        grads = extra.get("grads")
        if rule.criterion.needs_grads and grads is None:
            raise ValueError(
                "this score needs gradients, but jaxprune.prune (last in the chain) only sees "
                "the final updates: call tx.update(grads, state, params, grads=grads), or "
                "wrap the optimizer with jaxprune.pruned(inner_tx, score=...)")
        _, masks, stats, bookkeeping = _step_masks(rule, state, params, grads, checks)
        return (_rewrite_updates(updates, masks, params),
                PruneState(state.count + 1, masks, stats, state.key, **bookkeeping))

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
    criteria (saliency, Taylor, movement, Fisher) see the raw gradients;
    gradients at pruned positions are replaced (``where``), so a NaN
    gradient never reaches a pruned weight or its optimizer state. Keyword
    arguments and checks are those of ``prune``.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = jaxprune.pruned(optax.adam(1e-2), sparsity=0.5)
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, 0.0], [2.990000009536743, -3.990000009536743]]
    """
    rule = _build_rule(rule, score, sparsity, kwargs)
    checks = _Checks("jaxprune.pruned")
    where = resolve_where(where, kwargs.get("layer_axis"))

    def init(params):
        return PrunedState(inner.init(params), _init_state(rule, where, params, seed))

    def update(grads, state, params=None, **extra):
        ps = state.prune_state
        _check_params(params, ps.masks, "jaxprune.pruned")
        is_update, masks, stats, bookkeeping = _step_masks(rule, ps, params, grads, checks)

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
                PrunedState(inner_state, PruneState(ps.count + 1, masks, stats, ps.key,
                                                    **bookkeeping)))

    return optax.GradientTransformationExtraArgs(init, update)


def masks_of(state: optax.OptState) -> PyTree:
    """The masks held anywhere in an optimizer state (``optax.tree.get``).
    Warns about the alerts recorded in the state (``jaxprune.check``)."""
    diagnostics.check(state)
    found = optax.tree_utils.tree_get(state, "masks")
    if found is None:
        raise ValueError("no jaxprune masks in this optimizer state")
    return found


def sparsity_of(state: optax.OptState) -> jax.Array:
    """Current sparsity of the masks in an optimizer state (warns about its
    alerts, like ``masks_of``)."""
    from jaxprune.apply import sparsity
    return sparsity(masks_of(state))

