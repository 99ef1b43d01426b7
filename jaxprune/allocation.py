"""Per-leaf sparsity: uniform, Erdős–Rényi-kernel (ERK) or a per-path mapping.

Allocation is static: it reads paths and shapes only, so it runs once at
trace time and costs nothing under ``jit``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence, Union

import numpy as np

Sparsity = Union[float, Mapping[str, float]]

__all__ = ["check_sparsity", "uniform", "erk", "from_mapping", "allocate"]


def check_sparsity(value: Any, name: str = "sparsity") -> None:
    """Raises unless ``value`` is one number in [0, 1].

    Accepted: a Python or NumPy int/float, or a 0-d integer/float array
    (concrete or traced). Anything else (a string, None, a bool, a shape-(1,)
    array) is a ``TypeError`` naming ``name``; a concrete value outside
    [0, 1] or NaN is a ``ValueError``. Traced values are checked where they
    are used: the optax transformations keep the previous masks and report
    (``PruneState.refused``), the pure mask functions warn and clip.
    """
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
    else:
        dtype = getattr(value, "dtype", None)
        if dtype is None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
                                 or "float" in str(dtype)):
            raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} "
                            f"{_short(value)}")
        if np.shape(value) != ():
            raise TypeError(f"{name} must be a scalar, got an array of shape {np.shape(value)}; "
                            f"pass {name}=x[0] or float(x)")
        if _is_tracer(value):
            return
        v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _is_tracer(x: Any) -> bool:
    import jax
    return isinstance(x, jax.core.Tracer)


def uniform(sparsity: float, shapes: Sequence[tuple]) -> list[float]:
    """The same sparsity for every leaf."""
    return [sparsity] * len(shapes)


def erk(sparsity: float, shapes: Sequence[tuple], power: float = 1.0) -> list[float]:
    """Erdős–Rényi-kernel allocation (Evci et al. 2020, "Rigging the Lottery:
    Making All Tickets Winners"; Mocanu et al. 2018 for Erdős–Rényi).

    The density of a leaf is proportional to ``eps * (sum(shape) /
    prod(shape)) ** power``; ``eps`` is solved so that the total number of
    kept weights equals ``(1 - sparsity) * N``. Leaves whose density would
    exceed 1 are made dense and ``eps`` is solved again for the rest.

    >>> [round(s, 3) for s in erk(0.9, [(100, 100), (100, 10)])]
    [0.929, 0.61]
    """
    check_sparsity(sparsity)
    sizes = [int(np.prod(s)) for s in shapes]
    raw = [(sum(s) / max(np.prod(s), 1)) ** power for s in shapes]
    if _is_tracer(sparsity) or not isinstance(sparsity, (int, float, np.number)):
        return _erk_traced(sparsity, np.asarray(sizes, np.float32), np.asarray(raw, np.float32))
    dense: set[int] = set()
    while True:
        rhs, divisor = 0.0, 0.0
        for i, n in enumerate(sizes):
            if i in dense:
                rhs -= n * sparsity  # dense leaves take back their zeros
            else:
                rhs += n * (1.0 - sparsity)
                divisor += raw[i] * n
        if divisor == 0.0:
            return [0.0 if i in dense else 1.0 for i in range(len(sizes))]
        eps = rhs / divisor
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [0.0 if i in dense else float(min(max(1.0 - eps * raw[i], 0.0), 1.0))
            for i in range(len(sizes))]


def _erk_traced(sparsity, sizes: np.ndarray, raw: np.ndarray) -> list:
    """``erk`` for a traced sparsity: the same fixed point in jnp, with one
    pass per leaf (a leaf turns dense at most once)."""
    import jax.numpy as jnp
    s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    dense = jnp.zeros(len(sizes), bool)
    eps = jnp.float32(0.0)
    for _ in range(len(sizes)):
        rhs = jnp.sum(jnp.where(dense, -sizes * s, sizes * (1.0 - s)))
        divisor = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
        eps = rhs / jnp.maximum(divisor, 1e-30)
        dense = dense | (eps * raw > 1.0)
    per_leaf = jnp.where(dense, 0.0, jnp.clip(1.0 - eps * raw, 0.0, 1.0))
    return [per_leaf[i] for i in range(len(sizes))]


def from_mapping(mapping: Mapping[str, float], paths: Sequence[str]) -> list[float]:
    """Per-leaf sparsity from ``{path_regex: sparsity}``.

    A key equal to a path wins; otherwise the first key (in mapping order)
    whose regex is found in the path applies. A selected leaf that no key
    matches raises ``ValueError`` naming it.

    >>> from_mapping({"Dense_0": 0.5, ".*": 0.9}, ["Dense_0/kernel", "Dense_1/kernel"])
    [0.5, 0.9]
    """
    compiled = []
    for key, value in mapping.items():
        check_sparsity(value, f"sparsity[{key!r}]")
        try:
            compiled.append((key, re.compile(key), value))
        except re.error as e:
            raise ValueError(f"sparsity key {key!r} is not a valid regex: {e}") from None
    out = []
    for path in paths:
        if path in mapping:
            out.append(mapping[path])
            continue
        hit = next((v for _, rx, v in compiled if rx.search(path)), None)
        if hit is None:
            raise ValueError(
                f"leaf '{path}' is selected but no key of the sparsity mapping "
                f"{list(mapping)} matches it; add a key or narrow `where`")
        out.append(hit)
    return out


def allocate(sparsity: Any, distribution: Any, paths: Sequence[str],
             shapes: Sequence[tuple]) -> list[Any]:
    """Resolves ``sparsity`` and ``distribution`` to one sparsity per leaf.

    ``sparsity`` is a float (possibly traced) or a mapping path-regex ->
    float; ``distribution`` is "uniform", "erk" or such a mapping (then it
    overrides ``sparsity``).
    """
    if isinstance(distribution, Mapping):
        return from_mapping(distribution, paths)
    if isinstance(sparsity, Mapping):
        return from_mapping(sparsity, paths)
    check_sparsity(sparsity)
    if distribution == "uniform":
        return uniform(sparsity, shapes)
    if distribution == "erk":
        static = isinstance(sparsity, (int, float, np.number))
        return erk(float(sparsity) if static else sparsity, shapes)
    raise ValueError(f"distribution must be 'uniform', 'erk' or a mapping, got {distribution!r}")
