"""Sparsity schedules: the target sparsity at step t, and whether t updates masks.

A schedule is a ``SparsitySchedule``: ``schedule(step)`` is the target
sparsity (a float32 scalar) and ``schedule.is_update_step(step)`` a bool
scalar; both are jit-safe. Any optax schedule (a callable ``step -> value``)
can be turned into one with ``as_schedule``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxprune.allocation import check_sparsity

__all__ = ["SparsitySchedule", "as_schedule", "constant", "one_shot", "polynomial", "cubic",
           "iterative"]


class SparsitySchedule(NamedTuple):
    """Target sparsity and mask-update predicate as two jit-safe functions."""

    sparsity_fn: Callable[[jax.Array], jax.Array]
    update_fn: Callable[[jax.Array], jax.Array]
    final: Optional[float] = None  # the sparsity reached at the end, when known

    def __call__(self, step) -> jax.Array:
        return jnp.asarray(self.sparsity_fn(jnp.asarray(step)), jnp.float32)

    def is_update_step(self, step) -> jax.Array:
        return jnp.asarray(self.update_fn(jnp.asarray(step)), bool)


def _check_every(every: int) -> None:
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")


def constant(sparsity: float, every: Optional[int] = None) -> SparsitySchedule:
    """Always ``sparsity``; masks are set at step 0 and, with ``every``,
    recomputed every ``every`` steps.

    >>> s = constant(0.5)
    >>> float(s(10)), bool(s.is_update_step(0)), bool(s.is_update_step(1))
    (0.5, True, False)
    """
    check_sparsity(sparsity)
    if every is not None:
        _check_every(every)
    update = (lambda t: t == 0) if every is None else (lambda t: t % every == 0)
    return SparsitySchedule(lambda t: jnp.full((), sparsity, jnp.float32), update, sparsity)


def one_shot(target: float, step: int) -> SparsitySchedule:
    """Dense until ``step``, then ``target`` (masks computed once, at ``step``)."""
    check_sparsity(target, "target")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return SparsitySchedule(lambda t: jnp.where(t >= step, target, 0.0).astype(jnp.float32),
                            lambda t: t == step, target)


def polynomial(target: float, begin: int, end: int, every: int, power: float = 3.0,
               initial: float = 0.0) -> SparsitySchedule:
    """Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune"):
    ``s_t = target + (initial - target) * (1 - (t - begin) / (end - begin)) ** power``
    for ``begin <= t <= end``; ``initial`` before, ``target`` after. Masks
    are updated at ``begin``, every ``every`` steps after it, and at ``end``.

    >>> s = polynomial(0.9, begin=0, end=100, every=10)
    >>> [round(float(s(t)), 4) for t in (0, 50, 100, 200)]
    [0.0, 0.7875, 0.9, 0.9]
    """
    check_sparsity(target, "target")
    check_sparsity(initial, "initial")
    _check_every(every)
    if begin < 0 or end <= begin:
        raise ValueError(f"polynomial schedule needs 0 <= begin < end, got begin={begin}, end={end}")
    if power <= 0:
        raise ValueError(f"power must be positive, got {power}")

    def sparsity(t):
        frac = jnp.clip((t - begin) / (end - begin), 0.0, 1.0)
        return (target + (initial - target) * (1.0 - frac) ** power).astype(jnp.float32)

    def update(t):
        inside = (t >= begin) & (t <= end)
        return inside & (((t - begin) % every == 0) | (t == end))

    return SparsitySchedule(sparsity, update, target)


def cubic(target: float, begin: int, end: int, every: int,
          initial: float = 0.0) -> SparsitySchedule:
    """``polynomial`` with ``power=3``, the schedule of Zhu & Gupta 2017."""
    return polynomial(target, begin, end, every, 3.0, initial)


def iterative(rounds: int, per_round: float, every: int, begin: int = 0) -> SparsitySchedule:
    """Iterative magnitude pruning (Han et al. 2015; Frankle & Carbin 2019):
    round ``r`` (1..rounds) at step ``begin + r * every`` prunes ``per_round``
    of the weights that remain, so the sparsity after it is
    ``1 - (1 - per_round) ** r``.

    >>> s = iterative(rounds=3, per_round=0.5, every=10)
    >>> [float(s(t)) for t in (0, 10, 20, 30, 99)]
    [0.0, 0.5, 0.75, 0.875, 0.875]
    """
    check_sparsity(per_round, "per_round")
    _check_every(every)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")

    def done(t):
        return jnp.clip((t - begin) // every, 0, rounds)

    def sparsity(t):
        return (1.0 - (1.0 - per_round) ** done(t)).astype(jnp.float32)

    def update(t):
        r = (t - begin) // every
        return (t >= begin + every) & ((t - begin) % every == 0) & (r <= rounds)

    return SparsitySchedule(sparsity, update, 1.0 - (1.0 - per_round) ** rounds)


def as_schedule(sparsity: Union[float, SparsitySchedule, Callable[[Any], Any]],
                every: Optional[int] = None) -> SparsitySchedule:
    """Turns a float, a ``SparsitySchedule`` or any optax schedule into a
    ``SparsitySchedule``. A plain callable updates masks every ``every``
    steps (default 1); its values are clipped to [0, 1] where they are used.

    >>> import optax
    >>> s = as_schedule(optax.linear_schedule(0.0, 0.8, 100), every=10)
    >>> float(s(50)), bool(s.is_update_step(50)), bool(s.is_update_step(55))
    (0.4000000059604645, True, False)
    """
    if isinstance(sparsity, SparsitySchedule):
        return sparsity
    if callable(sparsity):
        every = 1 if every is None else every
        _check_every(every)
        return SparsitySchedule(lambda t: jnp.asarray(sparsity(t), jnp.float32),
                                lambda t: t % every == 0)
    return constant(sparsity, every)
