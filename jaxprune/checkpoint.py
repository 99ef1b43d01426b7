"""Checkpoints with orbax: training state, structured results, sparse exports.

Thin helpers on top of ``orbax.checkpoint`` (``CheckpointManager`` with
``args.Composite(StandardSave, JsonSave)``):

* ``save`` / ``restore``: any pytree of training state -- params, an optax
  state holding a ``PruneState`` (bool masks with ``None`` on unselected
  leaves, step count, criterion statistics, a typed PRNG key). Restoring
  against a target (concrete, or abstract from ``jax.eval_shape``) brings
  NamedTuple / dataclass states back typed and sharded like the target;
  a target that differs from the checkpoint is refused with the first
  mismatching path. Orbax writes each step to a temporary directory and
  renames it when complete, so a crash during a save leaves the earlier
  steps readable and ``restore`` picks the last complete one.
* ``save_structured`` / ``restore_structured``: shrunk variables plus the
  JSON pruning plan; restored without knowing the new shapes.
* ``export_sparse`` / ``load_sparse``: nonzero values plus bit-packed masks
  for deployment, with the size on disk against a dense checkpoint.

Usage (one step of a training loop)::

    mngr = jaxprune.checkpoint.manager("/ckpt", max_to_keep=3)
    jaxprune.checkpoint.save(mngr, step, {"params": params, "opt_state": opt_state})
    target = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
    state = jaxprune.checkpoint.restore(mngr, target)        # latest complete step
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.tree import leaves_with_paths

PyTree = Any
PathLike = Union[str, os.PathLike]

__all__ = ["manager", "save", "restore", "saved_metadata", "save_structured",
           "restore_structured", "SparseExport", "export_sparse", "load_sparse", "directory_size"]

_FORMAT = 1
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


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree, *,
         metadata: Optional[dict] = None, force: bool = False) -> bool:
    """Saves ``state`` (any pytree: params, optax state with jaxprune masks,
    ``None`` leaves, typed PRNG keys) as step ``step``.

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
    meta = {"format": _FORMAT, "leaves": _describe(state), "user": metadata}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    return mngr.save(int(step), force=force, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(_encode(state)), _META: ocp.args.JsonSave(meta)}))


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


def saved_metadata(mngr: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
    """The jaxprune metadata of a step (default: the latest complete one):
    ``{"format", "leaves": [[path, shape, dtype], ...], "user": metadata}``."""
    step = _latest(mngr, step)
    return mngr.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))[_META]


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


def restore(mngr: ocp.CheckpointManager, target: PyTree, step: Optional[int] = None) -> PyTree:
    """Restores a state saved by ``save`` into the structure of ``target``.

    Args:
      mngr: from ``manager``.
      target: a pytree like the saved one -- concrete arrays or abstract
        ``jax.ShapeDtypeStruct`` leaves, e.g.
        ``{"params": params, "opt_state": jax.eval_shape(tx.init, params)}``.
        Its NamedTuples / dataclasses come back typed, its typed PRNG keys
        as keys, and each array with the leaf's ``sharding`` (one device when
        the leaf has none).
      step: the step to restore; default the latest complete one.

    Returns:
      The restored pytree.

    Raises:
      ValueError: the target's structure, shapes or dtypes differ from the
        checkpoint (the message names the first mismatching path).
      FileNotFoundError: no complete checkpoint (for that step).
    """
    step = _latest(mngr, step)
    saved = saved_metadata(mngr, step)
    _check_target(saved["leaves"], _describe(target), step)
    abstract = jax.tree.map(_abstract_leaf, target, is_leaf=_is_none)
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
    return jax.tree.map(
        lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(_describe([t])[0][2]))
        if t is not None and _is_key(t) else r,
        target, restored, is_leaf=_is_none)


# ----------------------------------------------------------------------------
# Structured results: shrunk variables + plan.

def _tree_spec(tree: PyTree, path: str = "") -> Any:
    """JSON description of a nested dict/list/tuple of arrays."""
    if isinstance(tree, dict):
        bad = [k for k in tree if not isinstance(k, str)]
        if bad:
            raise TypeError(f"save_structured needs string dict keys; '{path}' has {bad[0]!r}")
        return {"dict": {k: _tree_spec(v, f"{path}/{k}".lstrip("/")) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_tree_spec(v, f"{path}/{i}".lstrip("/")) for i, v in enumerate(tree)]}
    if tree is None:
        return {"none": None}
    if not hasattr(tree, "shape") or not hasattr(tree, "dtype"):
        raise TypeError(f"save_structured stores nested dicts/lists of arrays; '{path}' is "
                        f"{type(tree).__name__} (convert NNX state with nnx.to_pure_dict)")
    return {"array": [[int(d) for d in tree.shape], str(jnp.dtype(tree.dtype))]}


def _abstract_from_spec(spec: Any) -> Any:
    kind, value = next(iter(spec.items()))
    if kind == "dict":
        return {k: _abstract_from_spec(v) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [_abstract_from_spec(v) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "none":
        return None
    shape, dtype = value
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                                sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def save_structured(directory: PathLike, variables: PyTree, plan: Any) -> None:
    """Saves structurally pruned (shrunk) variables with their pruning plan.

    The arrays go to ``directory/variables`` (orbax), the plan and the tree
    layout (paths, new shapes, dtypes) to ``directory/plan.json`` and
    ``directory/variables.json``, so ``restore_structured`` needs neither.

    Args:
      directory: a new directory (must not exist or be empty).
      variables: nested dicts / lists / tuples of arrays (a Flax Linen
        variable dict; ``nnx.to_pure_dict(state)`` for NNX).
      plan: any JSON-serialisable description of what was removed (the
        ``jaxprune.structured`` plan), needed to rebuild the model.
    """
    directory = Path(directory).absolute()
    spec = _tree_spec(variables)
    try:
        plan_text = json.dumps(plan, indent=1, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"the plan must be JSON-serialisable: {e}") from None
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; save_structured writes a new directory")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "variables", variables)
        ckptr.wait_until_finished()
    (directory / "variables.json").write_text(json.dumps({"format": _FORMAT, "tree": spec}))
    (directory / "plan.json").write_text(plan_text)


def restore_structured(directory: PathLike) -> tuple[PyTree, Any]:
    """Restores ``(variables, plan)`` written by ``save_structured``, with the
    shrunk shapes read from the saved layout (no model needed).

    Rebuild the model from its original config and the plan, then use the
    variables; their shapes are what the plan leads to.
    """
    directory = Path(directory).absolute()
    for name in ("variables.json", "plan.json", "variables"):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} has no '{name}'; not written by "
                                    "jaxprune.checkpoint.save_structured (or incomplete)")
    layout = json.loads((directory / "variables.json").read_text())
    abstract = _abstract_from_spec(layout["tree"])
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / "variables", abstract)
    return variables, json.loads((directory / "plan.json").read_text())


# ----------------------------------------------------------------------------
# Sparse export for deployment.

class SparseExport(NamedTuple):
    """What ``export_sparse`` wrote.

    Attributes:
      directory: where it went.
      sparse_bytes: its size on disk.
      dense_bytes: the size of the dense checkpoint it was compared with
        (``dense_checkpoint``), else the raw bytes of the dense arrays.
      ratio: ``sparse_bytes / dense_bytes``.
      raw_ratio: ``sparse_bytes`` over the raw bytes of the dense arrays
        (orbax compresses, so a dense checkpoint of a pruned model is
        already smaller than its raw bytes).
    """

    directory: str
    sparse_bytes: int
    dense_bytes: int
    ratio: float
    raw_ratio: float


def directory_size(directory: PathLike) -> int:
    """Total size in bytes of the files under ``directory`` (e.g. a dense
    checkpoint step, to compare with ``SparseExport.sparse_bytes``)."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def export_sparse(directory: PathLike, params: PyTree, masks: PyTree, *,
                  dense_checkpoint: Optional[PathLike] = None) -> SparseExport:
    """Writes only what a sparse model needs: per masked leaf the kept values
    (in row-major order) and the mask packed at 1 bit per weight; unmasked
    leaves (``None`` mask) are stored dense.

    Args:
      directory: a new directory (must not exist or be empty).
      params: nested dicts / lists of arrays.
      masks: bool masks like ``params`` (``None`` on unmasked leaves).
      dense_checkpoint: a dense checkpoint directory (e.g. a step directory
        written by ``save``) to report the size ratio against.

    Returns:
      A ``SparseExport`` with the file sizes.
    """
    from jaxprune.tree import check_same_structure
    check_same_structure(params, masks, "params", "masks", b_none_ok=True)
    p_items = leaves_with_paths(params)
    m_items = leaves_with_paths(masks, keep_none=True)
    arrays, layout, dense = {}, [], 0
    for i, ((path, p), (_, m)) in enumerate(zip(p_items, m_items)):
        p = np.asarray(p)
        dense += p.nbytes
        if m is None:
            arrays[f"leaf{i}"] = p
            layout.append([path, list(p.shape), str(p.dtype), False])
            continue
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise TypeError(f"masks must be bool; '{path}' is {m.dtype}")
        arrays[f"leaf{i}_values"] = p[m]
        arrays[f"leaf{i}_bits"] = np.packbits(m.reshape(-1))
        layout.append([path, list(p.shape), str(p.dtype), True])
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; export_sparse writes a new directory")
    spec = _tree_spec(jax.tree.map(lambda x: np.zeros((), np.int8), params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "arrays", arrays)
        ckptr.wait_until_finished()
    (directory / "sparse.json").write_text(json.dumps(
        {"format": _FORMAT, "leaves": layout, "tree": spec}))
    size = directory_size(directory)
    reference = dense if dense_checkpoint is None else directory_size(dense_checkpoint)
    return SparseExport(str(directory), size, reference, size / max(reference, 1),
                        size / max(dense, 1))


def load_sparse(directory: PathLike) -> tuple[PyTree, PyTree]:
    """Reads an ``export_sparse`` directory back as dense ``(params, masks)``
    (numpy arrays; pruned entries are 0)."""
    directory = Path(directory).absolute()
    if not (directory / "sparse.json").exists():
        raise FileNotFoundError(f"{directory} has no sparse.json; not written by export_sparse")
    info = json.loads((directory / "sparse.json").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(directory / "arrays")
    params, masks = [], []
    for i, (path, shape, dtype, masked) in enumerate(info["leaves"]):
        if not masked:
            params.append(np.asarray(arrays[f"leaf{i}"]))
            masks.append(None)
            continue
        n = int(np.prod(shape))
        m = np.unpackbits(np.asarray(arrays[f"leaf{i}_bits"]), count=n).astype(bool)
        full = np.zeros(n, dtype)
        full[m] = np.asarray(arrays[f"leaf{i}_values"])
        params.append(full.reshape(shape))
        masks.append(m.reshape(shape))
    treedef = jax.tree.structure(_abstract_from_spec(info["tree"]))
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, masks)
