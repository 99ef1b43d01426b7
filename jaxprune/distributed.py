"""Pruning across devices: averaged scores, bit-packed masks, mask resharding.

Under ``jax.jit`` with sharded params nothing is needed: scores and masks
inherit each parameter's sharding and the global threshold
(``jaxprune.threshold``) reduces per-shard 65,536-bin histograms across
devices, never the scores themselves. Under ``jax.shard_map`` or ``jax.pmap``
each device runs the step on its own batch, so the gradients (and any score
built from them) differ per device; average them over the data axis before
masks are built, or the devices would disagree on the masks:

* in ``jax.shard_map``, average the loss, ``lax.pmean(loss, "data")``: the
  gradients of replicated params then come out as the global mean (autodiff
  reduces them across devices); in ``jax.pmap``, average the gradients,
  ``average_gradients(grads, "data")`` (``lax.pmean``), before ``tx.update``;
* ``averaged(score, "data")`` when each device should score with its own
  gradients and the per-device scores are averaged instead.

``pack_masks``/``packed`` store masks at one bit per weight (``jnp.packbits``)
for memory-bound runs; ``match_sharding`` moves masks onto the params'
sharding, or refuses with the path of the first leaf that disagrees.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune.criteria import Criterion, criterion
from jaxprune.transform import PruneState
from jaxprune.tree import check_same_structure, leaves_with_paths, path_str

PyTree = Any

__all__ = ["average_gradients", "averaged", "pack_masks", "unpack_masks", "packed",
           "match_sharding"]


def _is_none(x: Any) -> bool:
    return x is None


def _varying_axes(x: Any) -> Optional[frozenset]:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return None if mat is None else frozenset(mat.varying)


def _tracks_variance(axis_name: Any) -> bool:
    """True inside ``shard_map`` with ``check_vma=True`` (the default), where
    types say which values vary across devices; False in ``pmap`` and
    ``shard_map(check_vma=False)``."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return all(n in (_varying_axes(lax.axis_index(n)) or ()) for n in names)


def average_gradients(grads: PyTree, axis_name: Any) -> PyTree:
    """Mean of per-device ``grads`` over the named axis (``lax.pmean``), for
    use inside ``jax.pmap`` / ``jax.shard_map`` before ``tx.update``.

    With the gradients averaged, every device feeds the same gradients to the
    pruning criterion and computes the same masks as one device on the whole
    batch. The rule differs between the two maps (see the shard_map docs):

    * ``jax.pmap`` and ``shard_map(check_vma=False)``: ``jax.grad`` returns
      each device's own gradient; this averages them.
    * ``shard_map`` (``check_vma=True``, the default): the gradient of a
      replicated parameter is already reduced across devices by autodiff --
      the global mean when the loss is averaged with
      ``lax.pmean(loss, axis_name)`` (do that), the *sum* otherwise. Such a
      leaf no longer varies across devices and is returned unchanged; only
      leaves that still vary (e.g. gradients taken with ``check_vma=False``)
      are averaged.

    ``None`` leaves are left alone.

    >>> import jax, jax.numpy as jnp
    >>> f = jax.pmap(lambda g: average_gradients({"w": g}, "i")["w"], axis_name="i")
    >>> n = jax.local_device_count()
    >>> float(f(jnp.arange(float(n)))[0]) == (n - 1) / 2
    True
    """
    typed = _tracks_variance(axis_name)
    names = set(axis_name if isinstance(axis_name, tuple) else (axis_name,))

    def one(g):
        if g is None:
            return None
        if typed and not names & (_varying_axes(g) or frozenset()):
            return g  # already reduced across devices by autodiff
        return lax.pmean(g, axis_name)

    return jax.tree.map(one, grads, is_leaf=_is_none)


def averaged(score: Any, axis_name: Any) -> Criterion:
    """A criterion whose per-device scores are averaged over ``axis_name``
    (``lax.pmean``) before masks are built.

    Use it inside ``jax.shard_map`` / ``jax.pmap`` when the gradients given to
    the pruning transformation are per-device (for instance the per-device
    ``|w * g_i|`` of SNIP, Lee et al. 2019, or the per-device ``g_i**2`` of
    the Fisher criterion, LeCun et al. 1990, averaged into a better estimate
    than the square of the mean gradient). Statistics accumulate per device
    and are averaged only at mask updates, so no collective runs on other
    steps. Every device ends with the same masks.

    Args:
      score: anything ``jaxprune.criteria.criterion`` accepts.
      axis_name: the mapped axis (or tuple of axes) to average over.

    Returns:
      A ``Criterion`` for ``prune(score=...)`` / ``pruned(inner, score=...)``.
    """
    base = criterion(score)

    def score_fn(stats, params, grads, key):
        local = base.score(stats, params, grads, key)
        return jax.tree.map(lambda s: None if s is None else lax.pmean(s, axis_name), local,
                            is_leaf=_is_none)

    return base._replace(score=score_fn)


def _pack_one(mask: jax.Array) -> jax.Array:
    # Along the last axis, so a leaf sharded on leading axes packs shard by
    # shard; a last axis sharded n ways stays local when (len / 8) % n == 0.
    return jnp.packbits(jnp.atleast_1d(mask), axis=-1)


def pack_masks(masks: PyTree) -> PyTree:
    """Bit-packs every bool mask leaf along its last axis (``jnp.packbits``):
    1 bit per weight in ``uint8`` arrays of shape ``(..., ceil(n_last / 8))``.
    ``None`` leaves stay ``None``.

    >>> import jax.numpy as jnp
    >>> pack_masks({"w": jnp.array([[True] * 8 + [False] * 2]), "b": None})["w"].tolist()
    [[255, 0]]
    """
    def one(path, m):
        if m is None:
            return None
        if getattr(m, "dtype", None) != jnp.bool_:
            raise TypeError(f"pack_masks needs bool masks; '{path_str(path)}' has "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
        return _pack_one(m)
    return jax.tree_util.tree_map_with_path(one, masks, is_leaf=_is_none)


def unpack_masks(packed_masks: PyTree, like: PyTree) -> PyTree:
    """Inverse of ``pack_masks``: bool masks shaped like the leaves of
    ``like`` (the params, or the original masks; only shapes are read).

    >>> import jax.numpy as jnp
    >>> w = jnp.zeros((1, 10))
    >>> m = {"w": jnp.arange(10).reshape(1, 10) % 3 > 0}
    >>> bool((unpack_masks(pack_masks(m), {"w": w})["w"] == m["w"]).all())
    True
    """
    check_same_structure(like, packed_masks, "like", "packed masks", b_none_ok=True,
                         check_shapes=False)

    def one(path, p, ref):
        if p is None:
            return None
        shape = tuple(np.shape(ref))
        last = shape[-1] if shape else 1
        lead = shape[:-1] if shape else ()
        want = (*lead, -(-last // 8))
        if tuple(p.shape) != want or p.dtype != jnp.uint8:
            raise ValueError(f"packed mask at '{path_str(path)}' is {p.dtype}{tuple(p.shape)}; "
                             f"a leaf of shape {shape} packs to uint8{want}")
        return jnp.unpackbits(p, axis=-1, count=last).astype(bool).reshape(shape)
    return jax.tree_util.tree_map_with_path(one, packed_masks, like, is_leaf=_is_none)


def _is_prune_state(x: Any) -> bool:
    return isinstance(x, PruneState)


def packed(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps a transformation holding jaxprune masks (``prune``, ``pruned``,
    or a chain with them) so that its state stores them bit-packed.

    Between steps each mask costs 1 bit per weight instead of 1 byte; inside
    the step the masks are unpacked (shapes from ``params``), ``tx`` runs
    unchanged, and the new masks are packed again, so results are identical
    to ``tx``. ``jaxprune.distributed.unpack_masks(masks_of(state), params)``
    recovers the bool masks.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = packed(jaxprune.pruned(optax.sgd(0.1), sparsity=0.5))
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
    >>> state = tx.init(params)
    >>> jaxprune.masks_of(state)["w"].dtype
    dtype('uint8')
    """
    def pack_state(state):
        return jax.tree.map(
            lambda s: s._replace(masks=pack_masks(s.masks)) if _is_prune_state(s) else s,
            state, is_leaf=_is_prune_state)

    def unpack_state(state, params):
        return jax.tree.map(
            lambda s: s._replace(masks=unpack_masks(s.masks, params)) if _is_prune_state(s)
            else s, state, is_leaf=_is_prune_state)

    def init(params):
        state = tx.init(params)
        if not any(_is_prune_state(s) for s in jax.tree.leaves(state, is_leaf=_is_prune_state)):
            raise ValueError("jaxprune.distributed.packed wraps a transformation whose state "
                             "holds a jaxprune PruneState (prune, pruned or a chain with them)")
        return pack_state(state)

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("jaxprune.distributed.packed needs the params to unpack the "
                             "masks: call tx.update(grads, opt_state, params)")
        full = unpack_state(state, params)
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            updates, full = tx.update(updates, full, params, **extra)
        else:
            updates, full = tx.update(updates, full, params)
        return updates, pack_state(full)

    return optax.GradientTransformationExtraArgs(init, update)


def _sharding_of(x: Any) -> Optional[jax.sharding.Sharding]:
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.Sharding):
        return s
    return None


def match_sharding(masks: PyTree, params: PyTree, *, strict: bool = False) -> PyTree:
    """Puts every mask on the sharding of its parameter.

    A mask laid out differently from its parameter still gives the right
    result, but every step then moves data between devices (or, with
    explicit sharding, fails to trace). This moves each disagreeing mask
    with ``jax.device_put`` (a one-off transfer), or with ``strict=True``
    raises ``ValueError`` naming the first disagreeing path. Call it on
    concrete arrays, e.g. after restoring a checkpoint or building masks
    outside the training step.

    Args:
      masks: mask pytree (bool arrays / ``None``) shaped like ``params``.
      params: the params whose shardings the masks should have.
      strict: raise instead of resharding.

    Returns:
      ``masks`` with each leaf on its parameter's sharding.
    """
    check_same_structure(params, masks, "params", "masks", b_none_ok=True)
    out = []
    p_items = leaves_with_paths(params)
    m_items = leaves_with_paths(masks, keep_none=True)
    for (path, p), (_, m) in zip(p_items, m_items):
        if m is None:
            out.append(None)
            continue
        ps, ms = _sharding_of(p), _sharding_of(m)
        if isinstance(m, jax.core.Tracer) or isinstance(p, jax.core.Tracer) or ps is None:
            raise TypeError(f"match_sharding needs concrete arrays; '{path}' is traced or "
                            "has no sharding (inside jit, give the masks the params' "
                            "in_shardings instead)")
        if ms is not None and ms.is_equivalent_to(ps, np.ndim(p)):
            out.append(m)
            continue
        if strict:
            raise ValueError(f"mask at '{path}' is sharded as {ms} but its parameter as {ps}")
        out.append(jax.device_put(m, ps))
    return jax.tree.unflatten(jax.tree.structure(masks, is_leaf=_is_none), out)
