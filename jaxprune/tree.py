"""Leaf paths and ``where=`` selectors: the one place that knows pytree plumbing.

Every leaf in jaxprune is named by its '/'-joined key path, e.g.
``params/Dense_0/kernel`` for a Flax Linen variable dict or ``layers/0/kernel``
for a Flax NNX ``State``. NNX wraps arrays in ``Variable`` nodes whose payload
sits behind a trailing ``.value`` attribute key; that key is dropped so that a
``State`` and its pure dict name their leaves identically.

A ``where=`` selector is one of:

* ``None`` -- floating-point leaves with ``ndim >= 2`` (kernels, embeddings),
  except leaves named ``bias`` or ``scale``: Flax attention biases are
  ``(heads, head_dim)``, and under ``nn.scan`` every bias and norm scale
  gains a layer axis (often without the partitioning metadata that
  ``scan_axes`` reads). With ``layer_axis`` a stacked leaf's layer axis is
  not counted either, so a scanned model's default selection is its
  unrolled twin's;
* a ``str`` -- a regular expression searched (``re.search``) in the path;
* a callable ``(path, leaf) -> bool``;
* a pytree of Python bools with the same structure as the tree.

Selection is static (decided from paths, shapes and dtypes), so it is free
under ``jit``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Where = Union[None, str, Callable[[str, Any], bool], PyTree]

__all__ = [
    "path_str",
    "leaves_with_paths",
    "paths",
    "select",
    "is_mask_leaf",
    "check_same_structure",
    "layer_axes",
    "scan_axes",
    "resolve_where",
]

#: ``layer_axis=`` of the mask functions and transformations: the axis of a
#: selected leaf that stacks layers (scanned layers), or None.
LayerAxis = Union[None, int, "dict[str, int]", Callable[[str, Any], Any]]


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: Sequence[Any]) -> str:
    """Joins a ``jax.tree_util`` key path into a '/'-separated string.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
    ['a/0', 'a/1']
    """
    keys = list(key_path)
    # NNX Variables flatten to (..., GetAttrKey('value')); drop it so that
    # State and State.to_pure_dict() share paths.
    if keys and type(keys[-1]).__name__ == "GetAttrKey" and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def _none_is_leaf(x: Any) -> bool:
    return x is None


def leaves_with_paths(tree: PyTree, *, keep_none: bool = False) -> list[tuple[str, Any]]:
    """Returns ``[(path, leaf), ...]`` in ``jax.tree.leaves`` order.

    With ``keep_none=True`` a ``None`` (an unselected mask leaf) is listed as a
    leaf instead of vanishing as an empty subtree.
    """
    is_leaf = _none_is_leaf if keep_none else None
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def paths(tree: PyTree) -> list[str]:
    """The '/'-joined path of every leaf of ``tree``, in leaf order.

    >>> paths({"params": {"Dense_0": {"kernel": 0, "bias": 1}}})
    ['params/Dense_0/bias', 'params/Dense_0/kernel']
    """
    return [p for p, _ in leaves_with_paths(tree)]


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


_NOT_WEIGHTS = ("bias", "scale")  # Flax's names for biases and norm scales


def _default_selected(path: str, leaf: Any, stacked: bool = False) -> bool:
    # A layer axis is not a weight axis: a stacked (L, d) vector is L vectors.
    return (_is_floating(leaf) and np.ndim(leaf) - stacked >= 2
            and path.rsplit("/", 1)[-1] not in _NOT_WEIGHTS)


def select(tree: PyTree, where: Where = None, *, require_any: bool = True,
           layer_axis: LayerAxis = None) -> list[bool]:
    """Evaluates a ``where=`` selector to one Python bool per leaf of ``tree``.

    Args:
      tree: any pytree of arrays (Flax variables, NNX ``State``, tuples, ...).
      where: ``None``, a regex ``str``, a callable ``(path, leaf) -> bool`` or
        a bool pytree shaped like ``tree`` (see the module docstring).
      require_any: raise if nothing is selected (a selector that matches no
        leaf is almost always a typo, and an empty mask would hide it).
      layer_axis: as in ``layer_axes``; only the default (``where=None``)
        reads it: a leaf that stacks layers is selected when each layer
        slice would be (``ndim - 1 >= 2``).

    Returns:
      ``list[bool]`` aligned with ``jax.tree.leaves(tree)``.

    >>> import jax.numpy as jnp
    >>> select({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
    [False, True]
    >>> select({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, where="b$")
    [True, False]
    >>> select({"layers": {"kernel": jnp.ones((4, 2, 2)), "scale": jnp.ones((4, 2))}},
    ...        layer_axis={"layers/": 0})
    [True, False]
    """
    items = leaves_with_paths(tree)
    where = resolve_where(where, layer_axis)
    if where is None:
        chosen = [_default_selected(p, leaf) for p, leaf in items]
    elif isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from None
        chosen = [bool(pattern.search(p)) and _is_floating(leaf) for p, leaf in items]
    elif callable(where) and not isinstance(where, (dict, list, tuple)):
        chosen = [bool(where(p, leaf)) for p, leaf in items]
    else:
        chosen = _select_from_tree(tree, where, items)
    if require_any and not any(chosen):
        raise ValueError(
            f"where={_short(where)} selects no leaf; the tree has leaves "
            f"{[p for p, _ in items][:8]}{' ...' if len(items) > 8 else ''}. "
            "The default selects floating leaves with ndim >= 2 not named bias or scale.")
    return chosen


def _select_from_tree(tree: PyTree, where: PyTree, items: list) -> list[bool]:
    def leaf_or_prefix(path, w, subtree):
        if not isinstance(w, (bool, np.bool_)):
            raise TypeError(
                f"where tree has a non-bool leaf {w!r} at '{path_str(path)}'; a "
                "where pytree must hold Python bools")
        return [bool(w)] * len(jax.tree.leaves(subtree))

    try:
        nested = jax.tree_util.tree_map_with_path(leaf_or_prefix, where, tree)
    except ValueError as e:
        raise ValueError(
            "where tree does not match the structure of the pytree "
            f"(leaves {[p for p, _ in items][:8]}): {e}") from None
    return [b for group in jax.tree.leaves(nested, is_leaf=lambda x: isinstance(x, list))
            for b in group]


def _short(where: Any) -> str:
    text = repr(where)
    return text if len(text) < 60 else text[:57] + "..."


def is_mask_leaf(leaf: Any) -> bool:
    """True for a boolean array leaf (a mask), False for anything else."""
    return getattr(leaf, "dtype", None) == jnp.bool_


def check_same_structure(a: PyTree, b: PyTree, a_name: str, b_name: str,
                         *, b_none_ok: bool = False, check_shapes: bool = True) -> None:
    """Raises ``ValueError`` naming the first path where ``a`` and ``b`` differ.

    With ``b_none_ok`` a ``None`` leaf in ``b`` matches any leaf of ``a`` (an
    unselected mask leaf).
    """
    a_items = leaves_with_paths(a)
    b_items = leaves_with_paths(b, keep_none=b_none_ok)
    a_paths = [p for p, _ in a_items]
    b_paths = [p for p, _ in b_items]
    if a_paths != b_paths:
        missing = [p for p in a_paths if p not in set(b_paths)]
        extra = [p for p in b_paths if p not in set(a_paths)]
        first = (missing or extra or [next(x for x, y in zip(a_paths, b_paths) if x != y)])[0]
        raise ValueError(
            f"{a_name} and {b_name} have different tree structures: first mismatch at "
            f"'{first}' (only in {a_name}: {missing[:5]}, only in {b_name}: {extra[:5]})")
    if not check_shapes:
        return
    for (path, x), (_, y) in zip(a_items, b_items):
        if y is None:
            continue
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"{a_name} and {b_name} differ in shape at '{path}': "
                f"{np.shape(x)} vs {np.shape(y)}")


def layer_axes(items: Sequence[tuple[str, Any]], layer_axis: LayerAxis) -> list[Any]:
    """Resolves ``layer_axis`` to one axis (a non-negative int) or None per
    ``(path, leaf)``.

    ``layer_axis`` is None (no leaf stacks layers), an int (every leaf),
    a mapping ``{path_regex: axis}`` (the exact path, else the first regex
    found in the path; unmatched leaves have none; ``scan_axes`` builds one
    from Flax metadata) or a callable ``(path, leaf) -> axis or None``.
    An axis the leaf does not have is an error naming the leaf.

    >>> import jax.numpy as jnp
    >>> layer_axes([("layers/kernel", jnp.ones((4, 2, 2))), ("head", jnp.ones((2, 2)))],
    ...            {"layers/": 0})
    [0, None]
    """
    if layer_axis is None:
        return [None] * len(items)
    pick = _axis_picker(layer_axis)
    out = []
    for path, leaf in items:
        axis = pick(path, leaf)
        if axis is None:
            out.append(None)
            continue
        if not _stacks(axis, leaf):
            raise ValueError(f"leaf '{path}' of shape {tuple(np.shape(leaf))} has no layer axis "
                             f"{axis!r}")
        out.append(int(axis) % np.ndim(leaf))
    return out


class _StackedDefault:
    """The default selector for a tree whose leaves may stack layers."""

    def __init__(self, layer_axis: LayerAxis):
        self.layer_axis, self._pick = layer_axis, _axis_picker(layer_axis)

    def __call__(self, path: str, leaf: Any) -> bool:
        return _default_selected(path, leaf, _stacks(self._pick(path, leaf), leaf))

    def __repr__(self) -> str:
        return f"None (layer_axis={self.layer_axis!r})"


def resolve_where(where: Where, layer_axis: LayerAxis) -> Where:
    """``where`` as the functions that take ``layer_axis`` read it: the
    default (``None``) does not count a stacked leaf's layer axis, so the
    leaves it picks in an ``nn.scan`` model are exactly those it picks in
    the unrolled model (kernels and embeddings, not the now 2-D LayerNorm
    scales and biases). Any other ``where`` is returned as is.

    >>> import jax.numpy as jnp
    >>> tree = {"layers": {"kernel": jnp.ones((4, 2, 2)), "scale": jnp.ones((4, 2))}}
    >>> select(tree, resolve_where(None, {"layers/": 0}))
    [True, False]
    """
    if where is not None or layer_axis is None:
        return where
    return _StackedDefault(layer_axis)


def _stacks(axis: Any, leaf: Any) -> bool:
    """``axis`` is an int naming an axis of ``leaf``."""
    ndim = np.ndim(leaf)
    return (isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_))
            and -ndim <= axis < ndim)


def _axis_picker(layer_axis: LayerAxis) -> Callable[[str, Any], Any]:
    """``(path, leaf) -> axis or None`` of a ``layer_axis`` argument
    (unvalidated: ``layer_axes`` checks the leaf has the axis)."""
    if layer_axis is None:
        return lambda path, leaf: None
    if isinstance(layer_axis, (bool, np.bool_)):
        raise TypeError("layer_axis must be an int, a mapping {path_regex: axis} or a callable, "
                        f"got {layer_axis!r}")
    if isinstance(layer_axis, (int, np.integer)):
        pick = lambda path, leaf: int(layer_axis)
    elif isinstance(layer_axis, dict) or hasattr(layer_axis, "items"):
        compiled = []
        for key, value in layer_axis.items():
            try:
                compiled.append((re.compile(key), value))
            except re.error as e:
                raise ValueError(f"layer_axis key {key!r} is not a valid regex: {e}") from None

        def pick(path, leaf):
            if path in layer_axis:
                return layer_axis[path]
            return next((v for rx, v in compiled if rx.search(path)), None)
    elif callable(layer_axis):
        pick = layer_axis
    else:
        raise TypeError("layer_axis must be an int, a mapping {path_regex: axis} or a callable, "
                        f"got {type(layer_axis).__name__}")
    return pick


def _partition_names(node: Any):
    """Logical axis names of a Flax Linen ``nn.Partitioned`` box or an NNX
    ``Variable`` (``out_sharding`` / ``sharding`` / ``sharding_names``
    metadata), else None. Duck-typed: core modules do not import flax."""
    names = getattr(node, "names", None)
    if names is not None and hasattr(node, "unbox"):
        return tuple(names)
    get = getattr(node, "get_metadata", None)
    if callable(get):
        meta = get()
        for key in ("out_sharding", "sharding_names", "sharding"):
            value = meta.get(key) if hasattr(meta, "get") else None
            if isinstance(value, (tuple, list)):
                return tuple(value)
    return None


def _is_boxed(x: Any) -> bool:
    return _partition_names(x) is not None


def scan_axes(tree: PyTree, name: str = "layers") -> dict[str, int]:
    """``{path: axis}`` of the leaves whose Flax partitioning metadata names
    ``name`` at some axis: the layer axis that ``nn.scan(...,
    metadata_params={nn.PARTITION_NAME: name})`` or ``nnx.vmap`` / ``nnx.scan``
    with ``transform_metadata={nnx.PARTITION_NAME: name}`` adds. Pass the
    result as ``layer_axis=`` (paths are those of the unboxed tree, so it
    applies to scores and params alike). Leaves without such metadata are
    left out; an empty dict means nothing was found.
    """
    found = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_boxed)
    for key_path, node in flat:
        names = _partition_names(node)
        if names is None or name not in names:
            continue
        path = path_str(list(key_path))
        found[path] = names.index(name)
    return found
