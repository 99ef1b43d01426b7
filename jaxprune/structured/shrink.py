"""Re-emit a traced jaxpr at reduced shapes.

The shrunk forward pass is the user's own computation, replayed equation by
equation with ``primitive.bind`` on the smaller arrays. Only the parameters
that name sizes along pruned axes are rewritten (``reshape`` sizes,
``broadcast_in_dim`` shapes, ``slice`` bounds, ``split`` sizes, ``gather`` /
``dynamic_slice`` slice sizes, grouped-conv ``feature_group_count``); ``iota``
values along a pruned axis are the kept indices; constant gather positions into a
pruned axis are renumbered to the kept channels; random bits are drawn at the
reduced shape (``random_bits="reduced"``, equal in distribution to the masked
model's draw) or drawn at the full shape and cut (``"exact"``, the masked model's
very bits); ``shard_map`` bodies are re-emitted shrunk. This works for any JAX
function, including Flax modules that hard-code their widths (Li et al. 2017;
Fang et al. 2023).

What a reduction over a pruned axis means is the plan's *semantics*:
``"masked"`` (``masked.py``) evaluates every equation on values that also carry
the removed channels' contribution, so the result equals the masked dense
model exactly; ``"native"`` (``native.py``) evaluates the plain reduced program
with every constant that encodes a pruned width (a mean's divisor,
``1/sqrt(head_dim)``) replaced by its reduced value.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.structured import blocks, collectives, control, equivariance, masked
from jaxprune.structured.trace import StructuredPruningError, parameter_error

__all__ = ["Shrinker", "SHRINK_RULES", "RANDOM_BITS"]

#: How random bits are drawn in a shrunk forward: at the reduced shapes (equal in
#: distribution, faster) or at full size and then cut (bit-identical to the masked model).
RANDOM_BITS = ("reduced", "exact")


def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


class Shrinker:
    """Evaluates the analysed jaxpr with every pruned axis cut to its kept indices."""

    def __init__(self, analysis: Any, keep: dict[int, np.ndarray], semantics: str = "masked",
                 constants: dict | None = None, random_bits: str = "reduced") -> None:
        self.a = analysis
        self.t = analysis.tracer
        self.keep = keep
        self.semantics = semantics
        # native: (scope, equation index, operand index) -> the reduced-width constant
        self.constants = constants or {}
        self.random_bits = check_random_bits(random_bits)
        self._kept_cache: dict[int, np.ndarray] = {}
        self.R = masked.Regions(self.t.uf, keep)

    def rule(self, name: str) -> Callable:
        return SHRINK_RULES.get(name, _default)

    # -- index bookkeeping -------------------------------------------------
    def kept(self, node: int) -> np.ndarray:
        r = self.t.uf.find(node)
        got = self._kept_cache.get(r)
        if got is None:
            got = self.t.uf.kept(r, self.keep)
            self._kept_cache[r] = got
        return got

    def old_shape(self, var: Any) -> tuple:
        return tuple(getattr(var.aval, "shape", ()))

    def new_shape(self, var: Any, scope: tuple) -> tuple:
        return tuple(len(self.kept(n)) for n in self.t.axes(var, scope))

    def cut(self, x: Any, var: Any, scope: tuple) -> Any:
        """Takes the kept indices of ``x`` (a full-size value of ``var``)."""
        return blocks.take_kept(x, self.t.axes(var, scope), self.kept)

    # -- evaluation --------------------------------------------------------
    def run(self, jaxpr: Any, consts: Sequence[Any], variables: Sequence[Any],
            inputs: Sequence[Any]) -> list:
        """Evaluates the top-level jaxpr on the small variables and the
        (full-width) inputs; returns the outputs at the reduced shapes."""
        invars = jaxpr.invars[len(variables):]
        if self.semantics == "masked":
            args = [masked.Val(x) for x in variables] + [
                masked.wrap_input(self, x, v, ()) for x, v in zip(inputs, invars)]
            return [o.main for o in masked.eval_jaxpr(self, jaxpr, consts, args, ())]
        # Inputs keep their full shape; only with prunable_io do removed input
        # features exist, and they are dropped here.
        args = list(variables) + [self.cut(x, v, ()) for x, v in zip(inputs, invars)]
        return self.eval(jaxpr, consts, args, ())

    def eval(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], scope: tuple) -> list:
        if self.semantics == "masked":
            return masked.eval_jaxpr(self, jaxpr, consts, args, scope)
        env: dict[Any, Any] = {}

        def read(v):
            return v.val if _is_lit(v) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.cut(jnp.asarray(c), v, scope)
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for i, eqn in enumerate(jaxpr.eqns):
            invals = [read(v) for v in eqn.invars]
            for k in range(len(invals)):
                new = self.constants.get((scope, i, k))
                if new is not None:  # a constant that encodes a pruned width
                    invals[k] = jnp.asarray(new, eqn.invars[k].aval.dtype)
            rule = SHRINK_RULES.get(eqn.primitive.name, _default)
            try:
                outs = rule(self, eqn, invals, scope, scope + (i,))
            except KeyError as e:  # a parameter renamed by a newer jax: say so
                if not e.args or e.args[0] in eqn.params:
                    raise
                raise parameter_error(eqn, e.args[0]) from None
            if not eqn.primitive.multiple_results and not isinstance(outs, list):
                outs = [outs]
            for v, x in zip(eqn.outvars, outs):
                if type(v).__name__ != "DropVar":
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def sub_eval(self, sub: Any, scope: tuple) -> Callable:
        """``sub``: a ``jaxpr_params.Sub`` (an open jaxpr and its consts)."""
        return lambda *args: self.eval(sub.jaxpr, sub.consts, args, scope)


def check_random_bits(random_bits: str) -> str:
    if random_bits not in RANDOM_BITS:
        raise ValueError(f"random_bits must be one of {RANDOM_BITS}, got {random_bits!r}")
    return random_bits


def _default(s: Shrinker, eqn: Any, invals: list, scope: tuple, sub: tuple) -> Any:
    return eqn.primitive.bind(*invals, **eqn.params)


def _with(**changes):
    def rule(s, eqn, invals, scope, sub):
        params = dict(eqn.params)
        for key, fn in changes.items():
            params[key] = fn(s, eqn, scope)
        return eqn.primitive.bind(*invals, **params)
    return rule


def _out_shape(s, eqn, scope):
    return s.new_shape(eqn.outvars[0], scope)


def _full_then_cut(s, eqn, invals, scope, sub):
    """``iota`` / ``random_bits``: computed at the full shape, then cut to the kept indices."""
    full = eqn.primitive.bind(*invals, **eqn.params)
    return s.cut(full, eqn.outvars[0], scope)


def _random_bits(s, eqn, invals, scope, sub):
    """Bits for the kept entries only: drawn at the reduced shape (the same
    distribution as the masked model's cut draw) unless ``random_bits="exact"``."""
    new = s.new_shape(eqn.outvars[0], scope)
    if s.random_bits == "exact" or new == s.old_shape(eqn.outvars[0]):
        return _full_then_cut(s, eqn, invals, scope, sub)
    return eqn.primitive.bind(*invals, **{**eqn.params, "shape": new})


def _rebind(s, eqn, invals, scope, sub):
    """A high-level primitive that stores its traced shapes: its lowering."""
    return equivariance.rebind(eqn, invals)


def _slice(s, eqn, invals, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    p = eqn.params
    starts, limits = list(p["start_indices"]), list(p["limit_indices"])
    for k, (nx, no) in enumerate(zip(s.t.axes(x, scope), s.t.axes(out, scope))):
        kin, kout = s.kept(nx), s.kept(no)
        if len(kin) == s.old_shape(x)[k] and len(kout) == s.old_shape(out)[k]:
            continue
        pos = np.searchsorted(kin, kout + starts[k])
        if len(pos) == 0 or not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))) \
                or not np.array_equal(kin[pos], kout + starts[k]):
            raise StructuredPruningError(f"internal: slice `{eqn}` does not map onto kept indices")
        starts[k], limits[k] = int(pos[0]), int(pos[0] + len(pos))
    return lax.slice(invals[0], starts, limits, p["strides"])


def _split(s, eqn, invals, scope, sub):
    axis = eqn.params["axis"]
    sizes = tuple(s.new_shape(o, scope)[axis] for o in eqn.outvars)
    return eqn.primitive.bind(*invals, **{**eqn.params, "sizes": sizes})


def _gather(s, eqn, invals, scope, sub):
    x = eqn.invars[0]
    old, new = s.old_shape(x), s.new_shape(x, scope)
    sizes = tuple(n if sz == o else sz for sz, o, n in zip(eqn.params["slice_sizes"], old, new))
    idx = invals[1]
    # A pruned operand axis read at constant positions (a ``take`` structure):
    # every position still read is a kept channel; renumber it among the kept.
    for k, d in enumerate(eqn.params["dimension_numbers"].start_index_map):
        kept = s.kept(s.t.axes(x, scope)[d])
        if len(kept) != old[d]:
            table = np.zeros(old[d], np.int64)
            table[kept] = np.arange(len(kept))
            col = jnp.take(jnp.asarray(table, idx.dtype), idx[..., k])
            idx = idx.at[..., k].set(col)
    return eqn.primitive.bind(invals[0], idx, *invals[2:], **{**eqn.params, "slice_sizes": sizes})


def _conv(s, eqn, invals, scope, sub):
    g = eqn.params.get("feature_group_count", 1)
    if g == 1:
        return _default(s, eqn, invals, scope, sub)
    dn = eqn.params["dimension_numbers"]
    lf = invals[0].shape[dn.lhs_spec[1]]
    rin = invals[1].shape[dn.rhs_spec[1]]
    return eqn.primitive.bind(*invals, **{**eqn.params, "feature_group_count": lf // rin})


#: Primitive name -> rule that re-emits it at the reduced shapes (others are re-bound as traced).
SHRINK_RULES: dict[str, Callable] = {
    "reshape": _with(new_sizes=_out_shape, dimensions=lambda s, e, sc: None),
    "broadcast_in_dim": _with(shape=_out_shape),
    "dynamic_slice": _with(slice_sizes=_out_shape),
    "iota": _full_then_cut,
    "random_bits": _random_bits,
    "call_hi_primitive": _rebind,
    "slice": _slice,
    "split": _split,
    "gather": _gather,
    "conv_general_dilated": _conv,
}
SHRINK_RULES.update(control.SHRINK_CONTROL)
SHRINK_RULES.update(collectives.SHRINK_COLLECTIVES)
