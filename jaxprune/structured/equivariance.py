"""Coupling for primitives without a rule, decided by an exact equivariance check.

A primitive with no entry in ``rules.TRACE_RULES`` (a new jax release's, or a
user's) is not guessed at. Each candidate channel axis ``j`` of its first output
(aligned with the operands' same-size axes as NumPy broadcasting aligns them) is
accepted only if slicing it commutes with the primitive, exactly:

    op(x[..., idx, ...], other operands sliced alike) == op(x)[..., idx, ...]

checked on random inputs at the traced shapes for several index sets (drop the
first index, drop the last, a random half, a single index), then for all
accepted axes sliced at once. The shrinker re-binds the primitive on the cut
operands, which is the left-hand side, so an accepted axis shrinks exactly as
tested. Every other axis of the equation is refused (``Tracer.refuse``): the
analysis raises, naming the primitive and the equation, if one of them would be
pruned. Primitives with effects or sub-jaxprs are never executed here.

This is the equivariance view of channel coupling (a layer commutes with a
permutation or selection of the channels it treats independently; Fang et al.
2023, DepGraph, decide the same by hand-written rules per layer type).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.trace import Tracer

__all__ = ["couple", "equivariant_axes", "rebind"]

_CACHE: dict[Any, tuple[frozenset, str]] = {}
_CACHE_SIZE = 512


def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _shape(v: Any) -> tuple:
    return tuple(getattr(v.aval, "shape", ()))


def _candidates(eqn: Any) -> dict[int, list[tuple[str, int, int]]]:
    """Axis ``j`` of the first output -> the ``("in"|"out", k, axis)`` it would couple."""
    if not eqn.outvars:
        return {}
    ref = _shape(eqn.outvars[0])
    rank = len(ref)
    out: dict[int, list[tuple[str, int, int]]] = {}
    for j in range(rank):
        if ref[j] <= 1:
            continue
        members = [("out", k, j) for k, o in enumerate(eqn.outvars)
                   if len(_shape(o)) == rank and _shape(o)[j] == ref[j]]
        for k, v in enumerate(eqn.invars):
            shape = _shape(v)
            a = j - (rank - len(shape))
            if not _is_lit(v) and 0 <= a < len(shape) and shape[a] == ref[j]:
                members.append(("in", k, a))
        out[j] = members
    return out


def _random(v: Any, rng: np.random.Generator) -> Optional[np.ndarray]:
    if _is_lit(v):
        return np.asarray(v.val)
    dtype, shape = getattr(v.aval, "dtype", None), _shape(v)
    try:
        dt = np.dtype(dtype)
    except TypeError:  # an extended dtype (PRNG keys): cannot make one up
        return None
    if dt.kind == "f" or dt == np.dtype(jax.numpy.bfloat16):
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    if dt.kind in "iu":
        return rng.integers(0, 4, shape).astype(dt)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    return None


def rebind(eqn: Any, args: Sequence[Any]) -> Any:
    """``eqn``'s primitive applied to ``args``, which may have other shapes than
    the traced ones. A high-level primitive (jax 0.12 "hijax", e.g.
    ``jnp.searchsorted``) stores its traced shapes, so it is expanded to its
    shape-generic lowering (``to_lojax``) instead of being bound."""
    to_lojax = vars(eqn.primitive).get("to_lojax")
    if to_lojax is not None:
        return to_lojax(*args, **eqn.params)
    return eqn.primitive.bind(*args, **eqn.params)


def _run(eqn: Any, args: Sequence[Any]) -> Optional[list[np.ndarray]]:
    try:
        with jax.ensure_compile_time_eval():
            outs = rebind(eqn, args)
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        return [np.asarray(o) for o in outs]
    except Exception:  # noqa: BLE001 - an op that fails at the sliced shape is not equivariant
        return None


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
            return False
    return True


def _commutes(eqn: Any, args: list, full: list, cut: dict[int, np.ndarray],
              cands: dict[int, list]) -> bool:
    """Whether cutting output axes ``cut`` (and their operand partners) commutes."""
    sliced_in = list(args)
    want = list(full)
    for j, idx in cut.items():
        for side, k, axis in cands[j]:
            if side == "in":
                sliced_in[k] = np.take(sliced_in[k], idx, axis=axis)
            else:
                want[k] = np.take(want[k], idx, axis=axis)
    got = _run(eqn, sliced_in)
    return got is not None and _same(got, want)


def _index_sets(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    half = np.sort(rng.choice(n, size=max(1, n // 2), replace=False))
    sets = [np.arange(1, n), np.arange(n - 1), half, rng.choice(n, size=1)]
    return [s for k, s in enumerate(sets) if not any(np.array_equal(s, t) for t in sets[:k])]


def _key(eqn: Any) -> Any:
    params = tuple(sorted((k, str(v)) for k, v in eqn.params.items()))
    ins = tuple((str(v.val), str(getattr(v.aval, "dtype", ""))) if _is_lit(v)
                else (_shape(v), str(v.aval.dtype)) for v in eqn.invars)
    outs = tuple((_shape(v), str(getattr(v.aval, "dtype", ""))) for v in eqn.outvars)
    return eqn.primitive.name, params, ins, outs


def equivariant_axes(eqn: Any) -> tuple[frozenset, str]:
    """Axes of ``eqn``'s first output along which slicing commutes with it
    exactly (see the module docstring), and why the others do not."""
    if getattr(eqn, "effects", None):
        return frozenset(), "it has side effects, so it is not run to check which axes it couples"
    if any(True for _ in _subjaxprs(eqn)):
        return frozenset(), ("it holds a sub-jaxpr; rules for such primitives live in "
                             "jaxprune/structured/control.py and jaxpr_params.py")
    try:
        key = _key(eqn)
        hit = _CACHE.get(key)
    except Exception:  # noqa: BLE001 - unhashable parameters: no cache
        key, hit = None, None
    if hit is not None:
        return hit
    result = _check(eqn)
    if key is not None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = result
    return result


def _check(eqn: Any) -> tuple[frozenset, str]:
    cands = _candidates(eqn)
    if not cands:
        return frozenset(), "its output has no axis that could carry a channel"
    rng = np.random.default_rng(0)
    args = [_random(v, rng) for v in eqn.invars]
    if any(a is None for a in args):
        return frozenset(), "it takes operands (e.g. PRNG keys) that cannot be drawn at random"
    full = _run(eqn, args)
    if full is None:
        return frozenset(), "it cannot be evaluated on random inputs"
    if not _same(_run(eqn, args) or [], full):
        return frozenset(), "it is not deterministic"
    accepted, failed = [], []
    for j in cands:
        n = _shape(eqn.outvars[0])[j]
        ok = all(_commutes(eqn, args, full, {j: idx}, cands) for idx in _index_sets(n, rng))
        (accepted if ok else failed).append(j)
    if len(accepted) > 1:
        joint = {j: np.sort(rng.choice(n, size=max(1, n // 2), replace=False))
                 for j, n in ((j, _shape(eqn.outvars[0])[j]) for j in accepted)}
        if not _commutes(eqn, args, full, joint, cands):
            return frozenset(), "slicing several axes at once does not commute with it"
    why = ("slicing output axis " + ", ".join(str(j) for j in failed) +
           " does not commute with it (checked exactly on random inputs)") if failed else \
        "these axes are reduced, broadcast or not aligned with an output axis"
    return frozenset(accepted), why


def _subjaxprs(eqn: Any):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if hasattr(item, "eqns") or type(item).__name__ == "ClosedJaxpr":
                yield jp.sub(item).jaxpr


def couple(t: Tracer, eqn: Any, scope: tuple) -> None:
    """The ``Tracer`` fallback: unites the axes that pass the equivariance
    check and refuses the rest (see the module docstring)."""
    accepted, why = equivariant_axes(eqn)
    cands = _candidates(eqn)
    coupled: set[int] = set()
    for j in accepted:
        nodes = [t.axes((eqn.invars if side == "in" else eqn.outvars)[k], scope)[axis]
                 for side, k, axis in cands[j]]
        for n in nodes[1:]:
            t.uf.union(nodes[0], n)
        coupled.update(nodes)
    rest = [n for v in itertools.chain(eqn.invars, eqn.outvars)
            for n in t.axes(v, scope) if n not in coupled and t.uf.size[n] > 1]
    t.refuse(eqn, rest, f"it has no coupling rule and {why}")
