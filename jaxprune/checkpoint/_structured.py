"""Structured results: shrunk variables + their JSON pruning plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxprune.checkpoint import _integrity
from jaxprune.checkpoint._integrity import CHECKSUM, is_empty_array
from jaxprune.checkpoint._state import _FORMAT, PathLike, PyTree, _is_none
from jaxprune.tree import leaves_with_paths

_WHAT = "save_structured"


def tree_spec(tree: PyTree, path: str = "", what: str = _WHAT) -> Any:
    """JSON description of a nested dict/list/tuple of arrays."""
    if isinstance(tree, dict):
        bad = [k for k in tree if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{what} needs string dict keys; '{path}' has {bad[0]!r}")
        return {"dict": {k: tree_spec(v, f"{path}/{k}".lstrip("/"), what)
                         for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [tree_spec(v, f"{path}/{i}".lstrip("/"), what) for i, v in enumerate(tree)]}
    if tree is None:
        return {"none": None}
    if not hasattr(tree, "shape") or not hasattr(tree, "dtype"):
        raise TypeError(f"{what} stores nested dicts/lists of arrays; '{path}' is "
                        f"{type(tree).__name__} (convert NNX state with nnx.to_pure_dict)")
    return {"array": [[int(d) for d in tree.shape], str(jnp.dtype(tree.dtype))]}


def abstract_from_spec(spec: Any) -> Any:
    """The tree ``tree_spec`` described, with ``jax.ShapeDtypeStruct`` leaves."""
    kind, value = next(iter(spec.items()))
    if kind == "dict":
        return {k: abstract_from_spec(v) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [abstract_from_spec(v) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "none":
        return None
    shape, dtype = value
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                                sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _drop_empty(tree: PyTree) -> PyTree:
    # orbax refuses zero-size arrays; the layout has their shape and dtype.
    return jax.tree.map(lambda x: None if is_empty_array(x) else x, tree, is_leaf=_is_none)


def _has_arrays(tree: PyTree) -> bool:
    return any(x is not None for x in jax.tree.leaves(_drop_empty(tree), is_leaf=_is_none))


def save_structured(directory: PathLike, variables: PyTree, plan: Any) -> None:
    """Saves structurally pruned (shrunk) variables with their pruning plan.

    The arrays go to ``directory/variables`` (orbax), the plan and the tree
    layout (paths, new shapes, dtypes, a checksum per array) to
    ``directory/plan.json`` and ``directory/variables.json``, so
    ``restore_structured`` needs neither. The directory is written under a
    temporary name and renamed when complete: an interrupted save leaves no
    ``directory`` (and the next save there removes its leftovers).

    Args:
      directory: a new directory (must not exist or be empty).
      variables: nested dicts / lists / tuples of arrays (a Flax Linen
        variable dict; ``nnx.to_pure_dict(state)`` for NNX).
      plan: any JSON-serialisable description of what was removed (the
        ``jaxprune.structured`` plan), needed to rebuild the model.
    """
    spec = tree_spec(variables)
    try:
        plan_text = json.dumps(plan, indent=1, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"the plan must be JSON-serialisable: {e}") from None
    items = leaves_with_paths(variables, keep_none=True)
    sums = _integrity.checksums([x for _, x in items])
    layout = {"format": _FORMAT, "tree": spec, "checksum": CHECKSUM,
              "checksums": [[p, s] for (p, _), s in zip(items, sums)]}
    with _integrity.atomic_directory(Path(directory), _WHAT) as tmp:
        if _has_arrays(variables):
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / "variables", _drop_empty(variables))
                ckptr.wait_until_finished()
        (tmp / "variables.json").write_text(json.dumps(layout))
        (tmp / "plan.json").write_text(plan_text)


def restore_structured(directory: PathLike, *, verify: bool = True) -> tuple[PyTree, Any]:
    """Restores ``(variables, plan)`` written by ``save_structured``, with the
    shrunk shapes read from the saved layout (no model needed), and checks
    every array against its stored checksum (unless ``verify=False``).

    Rebuild the model from its original config and the plan, then use the
    variables; their shapes are what the plan leads to.

    Raises:
      FileNotFoundError: nothing was saved at ``directory`` (an interrupted
        save leaves only a temporary sibling, named in the message).
      CorruptCheckpointError: an array does not match its checksum (the
        first such leaf path is named), or a file is damaged or missing.
    """
    directory = Path(directory).absolute()
    what = f"checkpoint {directory}"
    _integrity.check_complete(directory, _WHAT, ["variables.json", "plan.json"])
    layout = _integrity.load_json(what, directory / "variables.json")
    plan = _integrity.load_json(what, directory / "plan.json")
    try:
        abstract = abstract_from_spec(layout["tree"])
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
        raise _integrity.CorruptCheckpointError(
            f"{what} is damaged: {directory / 'variables.json'} has no valid tree layout "
            f"({type(e).__name__}: {e})") from None
    variables = None
    if _has_arrays(abstract):
        with _integrity.reading(what, directory, required=["variables/_METADATA"]):
            with ocp.StandardCheckpointer() as ckptr:
                variables = ckptr.restore(directory / "variables", _drop_empty(abstract))
    variables = jax.tree.map(
        lambda a, r: jnp.zeros(a.shape, a.dtype) if a is not None and r is None else r,
        abstract, variables if variables is not None else
        jax.tree.map(lambda _: None, abstract, is_leaf=_is_none), is_leaf=_is_none)
    if verify and "checksums" in layout:
        _integrity.verify(what, [p for p, _ in layout["checksums"]],
                          [s for _, s in layout["checksums"]],
                          [x for _, x in leaves_with_paths(variables, keep_none=True)])
    return variables, plan
