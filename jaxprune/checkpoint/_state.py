"""Training state: ``manager``, ``save``, ``restore``, ``saved_metadata``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.checkpoint import _integrity
from jaxprune.checkpoint._integrity import CHECKSUM, is_empty_array
from jaxprune.tree import leaves_with_paths

PyTree = Any
PathLike = Union[str, os.PathLike]

# 1: arrays + layout; 2: + one checksum per array (format 1 restores unverified).
_FORMAT = 2
_STATE, _META = "state", "jaxprune"


def _is_none(x: Any) -> bool:
    return x is None


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _describe(tree: PyTree) -> list[list]:
    """``[path, shape, dtype]`` per leaf (``[path, None, None]`` for None);
    keys are described by their key shape and ``key<impl>``."""
    out = []
    for path, x in leaves_with_paths(tree, keep_none=True):
        if x is None:
            out.append([path, None, None])
        elif _is_key(x):
            out.append([path, [int(d) for d in np.shape(x)], _key_dtype_name(x)])
        else:
            dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # Python scalars
            out.append([path, [int(d) for d in np.shape(x)], str(jnp.dtype(dtype))])
    return out


def _key_dtype_name(x: Any) -> str:
    # Concrete and abstract keys both carry their implementation on the dtype.
    impl = getattr(getattr(x.dtype, "_impl", None), "name", None) or str(x.dtype)
    return f"key<{impl}>"


def _key_impl(dtype_name: str) -> str:
    return dtype_name[len("key<"):-1]


def manager(directory: PathLike, *, max_to_keep: Optional[int] = None,
            save_interval_steps: int = 1, enable_async: bool = False,
            **options: Any) -> ocp.CheckpointManager:
    """An ``orbax.checkpoint.CheckpointManager`` for ``save`` / ``restore``.

    Args:
      directory: where step directories go (created if missing; a
        ``gs://`` path works as with orbax).
      max_to_keep: keep only the newest this many steps (None keeps all).
      save_interval_steps: ``save`` skips steps not divisible by this.
      enable_async: let ``save`` return before the write finishes (call
        ``mngr.wait_until_finished()`` before exiting).
      **options: more ``CheckpointManagerOptions`` fields.
    """
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                        save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=enable_async, **options)
    path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
    return ocp.CheckpointManager(path, options=opts)


def _encode(tree: PyTree) -> PyTree:
    # orbax stores plain arrays: a typed PRNG key goes as its uint32 key data.
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree,
                        is_leaf=_is_none)


def _drop_empty(tree: PyTree) -> PyTree:
    # orbax refuses zero-size arrays; their shape and dtype are in the metadata.
    return jax.tree.map(lambda x: None if is_empty_array(x) else x, tree, is_leaf=_is_none)


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree, *,
         metadata: Optional[dict] = None, force: bool = False) -> bool:
    """Saves ``state`` (any pytree: params, optax state with jaxprune masks,
    ``None`` leaves, typed PRNG keys, zero-size arrays) as step ``step``,
    with a checksum per array that ``restore`` verifies.

    The checksums are computed on device before the write starts (one jitted
    reduction over the state, a scalar per array comes to the host), so even
    with ``enable_async`` this waits for them.

    Args:
      mngr: from ``manager``.
      step: the training step.
      state: the pytree to save; arrays may be sharded (each host writes its
        shards; call ``save`` on every host).
      metadata: JSON-serialisable data stored beside the arrays (read back
        with ``saved_metadata``).
      force: save even if ``save_interval_steps`` would skip this step.

    Returns:
      Whether a checkpoint was started (as ``CheckpointManager.save``).
    """
    if not force and not mngr.should_save(int(step)):
        return False
    meta = {"format": _FORMAT, "leaves": _describe(state), "user": metadata}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    encoded = _encode(state)
    meta["checksum"] = CHECKSUM
    meta["checksums"] = _integrity.checksums(jax.tree.leaves(encoded, is_leaf=_is_none))
    return mngr.save(int(step), force=force, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(_drop_empty(encoded)),
           _META: ocp.args.JsonSave(meta)}))


def _latest(mngr: ocp.CheckpointManager, step: Optional[int]) -> int:
    mngr.wait_until_finished()
    if step is None:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {mngr.directory}")
    elif step not in mngr.all_steps():
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {mngr.directory}; "
                                f"steps present: {sorted(mngr.all_steps())}")
    return int(step)


def _what(mngr: ocp.CheckpointManager, step: int) -> str:
    return f"checkpoint step {step} in {mngr.directory}"


def saved_metadata(mngr: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
    """The jaxprune metadata of a step (default: the latest complete one):
    ``{"format", "leaves": [[path, shape, dtype], ...], "user": metadata,
    "checksum", "checksums"}``.

    Raises:
      CorruptCheckpointError: the metadata file is missing or damaged.
    """
    step = _latest(mngr, step)
    with _integrity.reading(_what(mngr, step), f"{mngr.directory}/{step}",
                            required=[f"{_META}/metadata"]):
        meta = mngr.restore(step, args=ocp.args.Composite(
            **{_META: ocp.args.JsonRestore()}))[_META]
    if not isinstance(meta, dict) or not isinstance(meta.get("leaves"), list):
        raise _integrity.CorruptCheckpointError(
            f"{_what(mngr, step)} is damaged: {_META}/metadata is not jaxprune metadata")
    return meta


def _check_target(saved: list, target: list, step: int) -> None:
    saved_paths = [s[0] for s in saved]
    target_paths = [t[0] for t in target]
    for i, (s, t) in enumerate(zip(saved, target)):
        if s[0] != t[0]:
            raise ValueError(
                f"checkpoint step {step} and the restore target differ in structure: first "
                f"mismatch at '{t[0]}' (target) vs '{s[0]}' (checkpoint)")
        if (s[1] is None) != (t[1] is None):
            has = "checkpoint" if t[1] is None else "target"
            raise ValueError(f"checkpoint step {step} and the restore target differ at "
                             f"'{s[0]}': only the {has} has an array there (the other has "
                             "None; were the masks built with another where=?)")
        if s[1] is not None and (list(s[1]) != list(t[1]) or s[2] != t[2]):
            raise ValueError(f"checkpoint step {step} and the restore target differ at "
                             f"'{s[0]}': checkpoint {s[2]}{tuple(s[1])}, target "
                             f"{t[2]}{tuple(t[1])}")
    if len(saved) != len(target):
        longer, which = (saved, "checkpoint") if len(saved) > len(target) else (target, "target")
        raise ValueError(f"checkpoint step {step} and the restore target differ in structure: "
                         f"'{longer[min(len(saved), len(target))][0]}' is only in the {which}"
                         f" ({len(saved_paths)} vs {len(target_paths)} leaves)")


def _abstract_leaf(x: Any) -> Any:
    if x is None:
        return None
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        if not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) \
                if isinstance(sharding, jax.sharding.NamedSharding) else \
                jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # Python scalars
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)


def _zeros_like(abstract: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.zeros(abstract.shape, abstract.dtype, device=abstract.sharding)


def restore(mngr: ocp.CheckpointManager, target: PyTree, step: Optional[int] = None, *,
            verify: bool = True) -> PyTree:
    """Restores a state saved by ``save`` into the structure of ``target``,
    and verifies every array against the checksum stored with it.

    Args:
      mngr: from ``manager``.
      target: a pytree like the saved one -- concrete arrays or abstract
        ``jax.ShapeDtypeStruct`` leaves, e.g.
        ``{"params": params, "opt_state": jax.eval_shape(tx.init, params)}``.
        Its NamedTuples / dataclasses come back typed, its typed PRNG keys
        as keys, and each array with the leaf's ``sharding`` (one device when
        the leaf has none).
      step: the step to restore; default the latest complete one.
      verify: check the checksums (one jitted pass over the restored arrays,
        on their devices). Checkpoints written before checksums existed
        (format 1) restore unverified.

    Returns:
      The restored pytree.

    Raises:
      ValueError: the target's structure, shapes or dtypes differ from the
        checkpoint (the message names the first mismatching path).
      CorruptCheckpointError: an array does not match its checksum (the
        message names the first such leaf path), or a file of the step is
        damaged or missing (the message names it).
      FileNotFoundError: no complete checkpoint (for that step).
    """
    step = _latest(mngr, step)
    saved = saved_metadata(mngr, step)
    _check_target(saved["leaves"], _describe(target), step)
    abstract = jax.tree.map(_abstract_leaf, target, is_leaf=_is_none)
    with _integrity.reading(_what(mngr, step), f"{mngr.directory}/{step}",
                            required=[f"{_STATE}/_METADATA"]):
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(_drop_empty(abstract))}))[_STATE]
    restored = jax.tree.map(lambda a, r: _zeros_like(a) if r is None and a is not None else r,
                            abstract, restored, is_leaf=_is_none)
    if verify and "checksums" in saved:
        _integrity.verify(_what(mngr, step), [s[0] for s in saved["leaves"]],
                          saved["checksums"], jax.tree.leaves(restored, is_leaf=_is_none))
    return jax.tree.map(
        lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(_describe([t])[0][2]))
        if t is not None and _is_key(t) else r,
        target, restored, is_leaf=_is_none)
