"""How a score function is fed during training.

``jaxprune.scores`` are pure functions of params (and gradients). Inside an
optimizer some need statistics carried between mask updates: movement
pruning sums ``-w * g`` over steps (Sanh et al. 2020) and the Fisher / OBD
criterion averages ``g**2`` (LeCun et al. 1990). A ``Criterion`` says what
to carry, how to fold in one step, and how to score at a mask update.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxprune import scores

PyTree = Any

__all__ = ["Criterion", "criterion"]


class Criterion(NamedTuple):
    """Statistics and scoring for one importance criterion.

    Attributes:
      init: ``params -> stats`` (a pytree, ``()`` when nothing is carried).
      accumulate: ``(stats, params, grads) -> stats`` run on every step, or
        None when the criterion needs no history.
      score: ``(stats, params, grads, key) -> scores`` run at mask updates.
      needs_grads: the criterion reads gradients.
      reset_after_update: ``stats`` restart from ``init`` after a mask update.
      elementwise: when set, ``score`` is this function applied to every
        leaf of params, and a mask rule may apply it inside its own passes
        rather than store the scores (magnitude: ``jnp.abs``).
      signed: the scores may be negative on purpose (movement), so the mask
        functions do not warn about negative scores.
    """

    init: Callable[[PyTree], PyTree]
    accumulate: Optional[Callable[[PyTree, PyTree, PyTree], PyTree]]
    score: Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree]
    needs_grads: bool = False
    reset_after_update: bool = False
    elementwise: Optional[Callable[[jax.Array], jax.Array]] = None
    signed: bool = False


def _none(params: PyTree) -> PyTree:
    return ()


def _zeros(params: PyTree) -> PyTree:
    # zeros_like keeps each parameter's sharding (jnp.zeros would not).
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)


def _fisher_init(params: PyTree) -> PyTree:
    return {"sum_sq": _zeros(params), "n": jnp.zeros((), jnp.float32)}


def _fisher_accumulate(stats, params, grads):
    sq = jax.tree.map(lambda s, g: s + jnp.square(g.astype(jnp.float32)), stats["sum_sq"], grads)
    return {"sum_sq": sq, "n": stats["n"] + 1.0}


def _fisher_score(stats, params, grads, key):
    mean_sq = jax.tree.map(lambda s: s / jnp.maximum(stats["n"], 1.0), stats["sum_sq"])
    return scores.fisher(params, mean_sq)


def _movement_accumulate(stats, params, grads):
    return jax.tree.map(lambda s, m: s + m.astype(jnp.float32), stats,
                        scores.movement(params, grads))


def criterion(score: Any) -> Criterion:
    """The ``Criterion`` for a score function.

    The functions of ``jaxprune.scores`` map to their training form:
    ``magnitude`` and ``random`` need params only; ``saliency`` and ``taylor``
    use the gradient of the mask-update step; ``movement`` accumulates
    ``-w * g`` over all steps; ``fisher`` averages ``g**2`` over the steps
    since the last mask update. Any other callable is ``f(params)`` if it
    takes one positional argument, ``f(params, grads)`` if it takes two. A
    ``Criterion`` is returned as is.
    """
    if isinstance(score, Criterion):
        return score
    if score is scores.magnitude:
        return Criterion(_none, None, lambda st, p, g, k: scores.magnitude(p),
                         elementwise=jnp.abs)
    if score is scores.random:
        return Criterion(_none, None, lambda st, p, g, k: scores.random(p, k))
    if score in (scores.saliency, scores.taylor):
        return Criterion(_none, None, lambda st, p, g, k: score(p, g), needs_grads=True)
    if score is scores.movement:
        return Criterion(_zeros, _movement_accumulate, lambda st, p, g, k: st, needs_grads=True,
                         signed=True)
    if score is scores.fisher:
        return Criterion(_fisher_init, _fisher_accumulate, _fisher_score, needs_grads=True,
                         reset_after_update=True)
    if not callable(score):
        raise TypeError(f"score must be a callable or a Criterion, got {score!r}")
    positional = [p for p in inspect.signature(score).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    if len(positional) == 1:
        return Criterion(_none, None, lambda st, p, g, k: score(p))
    if len(positional) == 2:
        return Criterion(_none, None, lambda st, p, g, k: score(p, g), needs_grads=True)
    raise TypeError(f"score {getattr(score, '__name__', score)!r} must take (params) or "
                    f"(params, grads); it takes {len(positional)} required arguments")
