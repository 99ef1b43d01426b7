"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding.

The procedure of Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis: Finding
Sparse, Trainable Neural Networks", ICLR): train, prune ``p`` of the
remaining weights by magnitude, reset the survivors to their initial values,
repeat. Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery
Ticket Hypothesis", ICML) rewind to the weights of an early step ``k``
instead of initialisation: take ``snapshot(params)`` at step ``k`` and pass
it as ``rewind_params``.

A round is three pure functions, usable on their own::

    early = lottery.snapshot(params_at_step_k)
    masks = lottery.prune_round(trained, masks, 0.2)   # 20% of what remains
    ticket = lottery.rewind(early, masks)              # survivors reset, rest 0

and ``imp`` runs the loop. Retrain a ticket with
``jaxprune.sparse_training.fixed_masks(optimizer, masks)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxprune import threshold
from jaxprune.allocation import check_sparsity
from jaxprune.apply import apply_masks
from jaxprune.tree import (LayerAxis, Where, check_same_structure, is_mask_leaf, layer_axes,
                           leaves_with_paths, resolve_where, select)

PyTree = Any

__all__ = ["Round", "snapshot", "dense_masks", "prune_round", "rewind", "imp"]


def snapshot(params: PyTree) -> PyTree:
    """A copy of ``params`` to rewind to: the initial weights (Frankle &
    Carbin 2019) or those at an early step ``k`` (Frankle et al. 2020). The
    copy owns its buffers, so later donation or in-place updates of
    ``params`` leave it intact.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> early = snapshot(params)
    >>> early["w"].tolist(), early["w"] is params["w"]
    ([1.0, 2.0], False)
    """
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def dense_masks(params: PyTree, where: Where = None) -> PyTree:
    """All-True masks on the leaves chosen by ``where`` (``None`` elsewhere):
    the masks before the first round.

    >>> import jax.numpy as jnp
    >>> m = dense_masks({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
    >>> m["b"] is None, m["w"].tolist()
    (True, [[True, True], [True, True]])
    """
    chosen = select(params, where)
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(
        treedef, [jnp.ones(jnp.shape(x), bool) if c else None for x, c in zip(leaves, chosen)])


def _is_none(x: Any) -> bool:
    return x is None


def _check_masks(params: PyTree, masks: PyTree) -> None:
    check_same_structure(params, masks, "params", "masks", b_none_ok=True)
    for path, m in leaves_with_paths(masks):
        if not is_mask_leaf(m):
            raise TypeError(f"masks must hold bool arrays or None; '{path}' has "
                            f"{getattr(m, 'dtype', type(m).__name__)}")


def prune_round(params: PyTree, masks: Optional[PyTree], fraction: Union[float, jax.Array], *,
                scope: str = "global", where: Where = None,
                layer_axis: LayerAxis = None) -> PyTree:
    """One round of iterative magnitude pruning (Frankle & Carbin 2019; Han
    et al. 2015): prunes ``fraction`` of the weights that ``masks`` still
    keeps, those of smallest ``|w|`` in ``params``; pruned entries stay
    pruned, so the masks of successive rounds nest.

    With ``scope="global"`` exactly ``round(fraction * R)`` entries go, ``R``
    the number remaining over all masked leaves; with ``scope="local"``
    ``round(fraction * R_leaf)`` per leaf (``fraction`` rounded to float32
    first, ties half to even, ties in ``|w|`` to the earlier entry). After
    ``r`` rounds from dense masks the sparsity is ``1 - (1 - fraction)**r``
    up to that rounding. Works under ``jit``.

    Args:
      params: trained weights (their magnitudes rank the survivors).
      masks: current masks (True = keep, ``None`` = not pruned), or ``None``
        for the first round: dense masks on the leaves chosen by ``where``.
      fraction: share of the remaining weights to prune, in [0, 1].
      scope: "global" (one ranking over all leaves) or "local" (per leaf).
      where: leaf selector, used only when ``masks`` is None.
      layer_axis: stacked (scanned) layers, as in
        ``jaxprune.masks.unstructured``: with ``scope="local"`` every layer
        slice loses ``round(fraction * R_slice)``, as if it were a leaf of
        its own (the global ranking is per entry and does not change).

    >>> import jax.numpy as jnp
    >>> w = {"w": jnp.array([[4.0, -1.0], [3.0, 2.0]])}
    >>> m = prune_round(w, None, 0.5)
    >>> m["w"].tolist()
    [[True, False], [True, False]]
    >>> prune_round(w, m, 0.5)["w"].tolist()
    [[True, False], [False, False]]
    """
    check_sparsity(fraction, "fraction")
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    if masks is None:
        masks = dense_masks(params, resolve_where(where, layer_axis))
    _check_masks(params, masks)
    if not _any_mask(masks):
        raise ValueError("masks select no leaf; nothing to prune")
    flat_masks, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    items = [(p, x) for (p, x), m in zip(leaves_with_paths(treedef.unflatten(
        treedef.flatten_up_to(params))), flat_masks) if m is not None]
    axes = tuple(layer_axes(items, layer_axis)) if scope == "local" else None
    return _prune_round(params, masks, jnp.asarray(fraction, jnp.float32), scope, axes)


def _any_mask(masks: PyTree) -> bool:
    return any(m is not None for m in jax.tree.leaves(masks, is_leaf=_is_none))


@functools.partial(jax.jit, static_argnames=("scope", "axes"))
def _prune_round(params: PyTree, masks: PyTree, fraction: jax.Array, scope: str,
                 axes: Optional[tuple] = None) -> PyTree:
    # One compiled program per model: eager IMP loops do not dispatch op by op.
    flat_masks, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    flat_params = treedef.flatten_up_to(params)
    picked = [(m, jnp.abs(p)) for m, p in zip(flat_masks, flat_params) if m is not None]

    def count(ms):
        return threshold.prune_count(fraction, sum(jnp.sum(m, dtype=jnp.int32) for m in ms))

    if scope == "global":
        ms, scores = [m for m, _ in picked], [s for _, s in picked]
        # Pruned entries are protected: they rank above every remaining score.
        gone = threshold.lowest(scores, count(ms), protected=[~m for m in ms])
    else:  # one selection per leaf (per layer slice of a stacked leaf)
        axes = axes or (None,) * len(picked)
        ms = [m if a is None else jnp.moveaxis(m, a, 0) for (m, _), a in zip(picked, axes)]
        scores = [s if a is None else jnp.moveaxis(s, a, 0) for (_, s), a in zip(picked, axes)]
        counts = [count([m]) if a is None else threshold.prune_count(
            fraction, jnp.sum(m, axis=tuple(range(1, m.ndim)), dtype=jnp.int32))
            for m, a in zip(ms, axes)]
        gone = threshold._select_each(scores, counts, protected=[~m for m in ms],
                                      rows=[a is not None for a in axes])
        gone = [g if a is None else jnp.moveaxis(g, 0, a) for g, a in zip(gone, axes)]
    new = iter(m & ~g for (m, _), g in zip(picked, gone))
    return jax.tree.unflatten(treedef, [None if m is None else next(new) for m in flat_masks])


def rewind(snapshot_params: PyTree, masks: PyTree) -> PyTree:
    """The ticket: survivors reset to ``snapshot_params`` (initial or step-k
    weights, Frankle & Carbin 2019; Frankle et al. 2020), pruned entries 0.0;
    leaves with a ``None`` mask are taken from the snapshot.

    >>> import jax.numpy as jnp
    >>> rewind({"w": jnp.array([0.5, -0.7])}, {"w": jnp.array([True, False])})["w"].tolist()
    [0.5, 0.0]
    """
    return apply_masks(snapshot_params, masks)


class Round(NamedTuple):
    """One IMP round: ``trained`` (weights after training with the masks of
    the previous round), ``masks`` (after pruning them) and ``ticket``
    (``rewind(rewind_params, masks)``, to be trained in the next round)."""

    trained: PyTree
    masks: PyTree
    ticket: PyTree


def imp(train_fn: Callable[[PyTree, PyTree], PyTree], params: PyTree, *, rounds: int,
        fraction: float, rewind_params: Optional[PyTree] = None, scope: str = "global",
        where: Where = None, layer_axis: LayerAxis = None) -> list[Round]:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
    step-k rewinding: Frankle et al. 2020).

    Round ``r = 1..rounds`` trains the current network with
    ``train_fn(params, masks)`` (dense masks in round 1), prunes ``fraction``
    of its remaining weights by magnitude (``prune_round``) and rewinds the
    survivors to ``rewind_params`` (default: ``params``, i.e. the weights at
    initialisation). After round ``r`` the sparsity is ``1 - (1 -
    fraction)**r`` (exact counts, see ``prune_round``). The last round's
    ``ticket`` and ``masks`` are the lottery ticket; train it once more with
    ``train_fn`` to evaluate it.

    For step-k rewinding, train ``k`` steps from initialisation, take
    ``early = snapshot(params_k)`` and call ``imp(train_fn, early, ...)``.

    Args:
      train_fn: ``(params, masks) -> trained params``; it must keep the
        pruned weights at 0 (e.g. train with
        ``jaxprune.sparse_training.fixed_masks(optimizer, masks)``).
      params: the weights round 1 starts from.
      rounds: number of prune-and-rewind rounds (>= 1).
      fraction: share of the remaining weights pruned per round.
      rewind_params: weights survivors are reset to (default ``params``).
      scope, where, layer_axis: as in ``prune_round``.

    Returns:
      ``[Round(trained, masks, ticket), ...]``, one per round.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
    >>> out = imp(lambda p, m: p, params, rounds=2, fraction=0.5)
    >>> [int(r.masks["w"].sum()) for r in out]
    [4, 2]
    >>> out[-1].ticket["w"].tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 7.0, 8.0]]
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    check_sparsity(fraction, "fraction")
    rewind_params = snapshot(params) if rewind_params is None else rewind_params
    masks = dense_masks(params, resolve_where(where, layer_axis))
    current = params
    history = []
    for _ in range(rounds):
        trained = train_fn(current, masks)
        masks = prune_round(trained, masks, fraction, scope=scope, layer_axis=layer_axis)
        current = rewind(rewind_params, masks)
        history.append(Round(trained, masks, current))
    return history
