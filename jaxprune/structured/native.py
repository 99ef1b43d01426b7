"""Native semantics: the shrunk forward computes what the model built at the
reduced widths computes.

A model built at a smaller width divides its means by the smaller count, scales
attention logits by ``1/sqrt`` of the smaller head size, and so on: every
constant that encodes a pruned width follows it. The traced jaxpr holds these
constants as literals (or scalars folded from literals), so they must be found.
Two ways, the exact one first:

* **Differential** (``align``): when the user's function can be run at the
  reduced widths (a plain function of the arrays, or ``rebuild=``), it is
  traced a second time there and aligned equation by equation with the full
  trace: same primitives, and every value at exactly the shape the plan gives
  it. The aligned second trace *is* the native model; a misalignment (a
  config attribute such as ``num_groups`` that no longer fits the plan) is an
  error naming the equation.
* **Analytic** (``width_constants``): otherwise a scalar constant is a width
  constant where it normalises a reduction over a pruned axis: it divides (or
  multiplies by the inverse of) a ``reduce_sum`` over that axis by its count
  ``N`` (``N - 1`` with ``ddof=1``), or scales an activation-by-activation
  contraction (attention logits, before or after the product) by
  ``1/sqrt(N)``; it becomes the same function of the reduced count. Where the
  program holds something that may encode a width but matches no such pattern
  -- a constant array or an ``iota`` along a pruned axis (a sinusoidal table,
  RoPE frequencies), or a scalar equal to ``N``, ``1/N``, ``sqrt(N)`` or
  ``1/sqrt(N)`` of a pruned axis it multiplies -- it cannot tell, and refuses
  naming the equation (pass ``rebuild=``, or use ``semantics="masked"``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.trace import StructuredPruningError

__all__ = ["width_constants", "align", "trace_reference", "Misaligned"]

_SHAPE_ONLY = frozenset("""broadcast_in_dim reshape squeeze expand_dims convert_element_type
transpose copy copy_p reduce_precision stop_gradient sharding_constraint mesh_cast""".split())


class Misaligned(StructuredPruningError):
    """The program at the reduced widths does not follow the plan."""


def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _text(eqn: Any) -> str:
    text = str(eqn).replace("\n", " ")
    return text if len(text) < 160 else text[:157] + "..."


def _close(c: float, target: float, dtype: Any) -> bool:
    eps = float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0
    return target != 0 and abs(c - target) <= 4 * eps * abs(target) + 1e-12 * abs(target)


def _cannot_tell(eqn: Any, what: str) -> StructuredPruningError:
    return StructuredPruningError(
        f"native semantics: cannot tell whether {what} in `{_text(eqn)}` encodes a pruned "
        "width (a model built at the reduced width would recompute it). Pass rebuild= (the "
        "model built at the reduced widths), use semantics='masked', or keep this axis "
        "(ignore=).")


# ---------------------------------------------------------------- analytic
class _Walker:
    """Forward dataflow over the jaxpr (scopes as the shrinker's) that finds
    normalised reductions over pruned axes and their width constants."""

    def __init__(self, s: Any) -> None:
        self.s = s
        self.R = s.R
        self.const: dict = {}    # (scope, var) -> concrete scalar
        self.count: dict = {}    # (scope, var) -> (N, N'): sum / act-by-act product over pruned axes
        self.scaled: dict = {}   # (scope, var) -> [(scope, eqn index, operand, c, 'mul'|'div')]
        self.contracted: dict = {}  # (scope, var) -> (N, N'): any other product over pruned axes
        self.dep: set = set()    # (scope, var) that depend on the model inputs
        self.out: dict = {}      # (scope, eqn index, operand) -> reduced constant
        self.suspect: list = []  # (key, eqn, c): a scalar that matches a pruned width

    def sizes(self, var: Any, scope: tuple) -> tuple:
        old = tuple(var.aval.shape)
        new = self.s.new_shape(var, scope)
        return old, new

    def pruned_axes(self, var: Any, scope: tuple) -> list[int]:
        old, new = self.sizes(var, scope)
        return [k for k, (a, b) in enumerate(zip(old, new)) if a != b]

    def value(self, v: Any, scope: tuple) -> Optional[np.ndarray]:
        if _is_lit(v):
            return np.asarray(v.val)
        return self.const.get((scope, v))

    def alias(self, outer: Any, oscope: tuple, inner: Any, iscope: tuple) -> None:
        """``inner`` is the same value as ``outer`` (across a call boundary)."""
        if _is_lit(outer):
            self.const[(iscope, inner)] = np.asarray(outer.val)
            return
        for table in (self.const, self.count, self.scaled, self.contracted):
            if (oscope, outer) in table:
                table[(iscope, inner)] = table[(oscope, outer)]
        if (oscope, outer) in self.dep:
            self.dep.add((iscope, inner))

    def walk(self, jaxpr: Any, consts: Any, scope: tuple) -> None:
        for v, c in zip(jaxpr.constvars, consts):
            if np.ndim(c) == 0 and not isinstance(c, jax.core.Tracer):
                self.const[(scope, v)] = np.asarray(c)
            elif self.pruned_axes(v, scope):
                raise StructuredPruningError(
                    f"native semantics: cannot tell whether a constant array of shape "
                    f"{tuple(v.aval.shape)} along a pruned axis encodes the width (a sinusoidal "
                    "or RoPE table would be recomputed at the reduced width). Pass rebuild= (the "
                    "model built at the reduced widths), use semantics='masked', or keep this "
                    "axis (ignore=).")
        for i, eqn in enumerate(jaxpr.eqns):
            self.equation(eqn, scope, i)

    def equation(self, eqn: Any, scope: tuple, i: int) -> None:
        name = eqn.primitive.name
        sub = scope + (i,)
        ins = eqn.invars
        if any((scope, v) in self.dep for v in ins if not _is_lit(v)):
            for o in eqn.outvars:
                self.dep.add((scope, o))
        if name in jp.CALL_PARAMS:
            body = jp.call(eqn)
            for outer, inner in zip(ins, body.jaxpr.invars):
                self.alias(outer, scope, inner, sub)
            self.walk(body.jaxpr, body.consts, sub)
            for outer, inner in zip(eqn.outvars, body.jaxpr.outvars):
                if not _is_lit(inner):
                    self.alias(inner, sub, outer, scope)
            return
        if name in ("scan", "while", "cond"):
            self.control(eqn, scope, sub)
            return
        if name == "iota" and self.pruned_axes(eqn.outvars[0], scope):
            raise _cannot_tell(eqn, "an iota along a pruned axis")
        vals = [self.value(v, scope) for v in ins]
        out = eqn.outvars[0] if eqn.outvars else None
        if out is not None and ins and all(x is not None for x in vals) \
                and not eqn.primitive.multiple_results and len(out.aval.shape) == 0:
            with jax.ensure_compile_time_eval():
                self.const[(scope, out)] = np.asarray(
                    eqn.primitive.bind(*[jnp.asarray(x) for x in vals], **eqn.params))
            return
        if name in _SHAPE_ONLY:
            if _is_lit(ins[0]):
                return
            src = (scope, ins[0])
            for table in (self.count, self.scaled, self.contracted):
                if src in table:
                    table[(scope, out)] = table[src]
            return
        if name == "reduce_sum":
            self.reduction(eqn, scope)
        elif name == "dot_general":
            self.contraction(eqn, scope, i)
        elif name in ("mul", "div"):
            self.scale(eqn, scope, i, vals)

    def reduction(self, eqn: Any, scope: tuple) -> None:
        x = eqn.invars[0]
        old, new = self.sizes(x, scope)
        axes = [a % len(old) for a in eqn.params["axes"]]
        n, n2 = math.prod(old[a] for a in axes), math.prod(new[a] for a in axes)
        if n != n2:
            self.count[(scope, eqn.outvars[0])] = (n, n2)

    def contraction(self, eqn: Any, scope: tuple, i: int) -> None:
        (lc, rc), _ = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars[:2]
        old, new = self.sizes(lhs, scope)
        n, n2 = math.prod(old[a] for a in lc), math.prod(new[a] for a in lc)
        if n == n2:
            return
        if not all((scope, v) in self.dep for v in (lhs, rhs)):
            # x @ W over a pruned axis: a 1/sqrt(N) after it may or may not be a width.
            self.contracted[(scope, eqn.outvars[0])] = (n, n2)
            return
        # An activation-by-activation product (attention logits): a scale of
        # 1/sqrt(N) on an operand or on the result follows the reduced N.
        for v in (lhs, rhs):
            for (sc, j, k, c, op, dt, e) in self.scaled.get((scope, v), []):
                new_c = _match(c, n, n2, op, dt, ("sqrt",))
                if new_c is not None:
                    self.out[(sc, j, k)] = new_c
        self.count[(scope, eqn.outvars[0])] = (n, n2)

    def scale(self, eqn: Any, scope: tuple, i: int, vals: list) -> None:
        a, b = eqn.invars
        name = eqn.primitive.name
        for k, (x, c) in enumerate(((a, vals[1]), (b, vals[0]))):
            if c is None or np.ndim(c) != 0 or (name == "div" and k == 1):
                continue
            ck = 1 - k  # operand index of the constant
            dt = eqn.invars[ck].aval.dtype
            cv = float(c)
            got = self.count.get((scope, x))
            if got is not None:
                new_c = _match(cv, got[0], got[1], name, dt, ("count", "ddof", "sqrt"))
                if new_c is not None:
                    self.out[(scope, i, ck)] = new_c
                    return
            self.scaled.setdefault((scope, eqn.outvars[0]), []).append(
                (scope, i, ck, cv, name, dt, eqn))
            old, new = self.sizes(x, scope)
            widths = [n for n, n2 in zip(old, new) if n != n2]
            if (scope, x) in self.contracted:
                widths.append(self.contracted[(scope, x)][0])
            for n in widths:
                if any(_close(cv, t, dt) for t in (n, 1.0 / n, math.sqrt(n), 1.0 / math.sqrt(n))):
                    self.suspect.append(((scope, i, ck), eqn, cv))
            return

    def control(self, eqn: Any, scope: tuple, sub: tuple) -> None:
        name = eqn.primitive.name
        if name == "scan":
            lay = jp.scan(eqn)
            bodies = [(lay.body, sub, list(eqn.invars))]
        elif name == "while":
            lay = jp.while_loop(eqn)
            cn, bn = lay.cond_nconsts, lay.body_nconsts
            carry = list(eqn.invars[cn + bn:])
            bodies = [(lay.cond, sub + ("cond",), list(eqn.invars[:cn]) + carry),
                      (lay.body, sub + ("body",), list(eqn.invars[cn:cn + bn]) + carry)]
        else:
            bodies = [(b, sub + (k,), list(eqn.invars[1:]))
                      for k, b in enumerate(jp.cond_branches(eqn))]
        dep = any((scope, v) in self.dep for v in eqn.invars if not _is_lit(v))
        for body, bscope, outer in bodies:
            for o, inner in zip(outer, body.jaxpr.invars):
                if not _is_lit(o) and (scope, o) in self.dep:
                    self.dep.add((bscope, inner))
            self.walk(body.jaxpr, body.consts, bscope)
        if dep:
            for o in eqn.outvars:
                self.dep.add((scope, o))


def _match(c: float, n: int, n2: int, op: str, dtype: Any, kinds: tuple) -> Optional[float]:
    """The reduced constant if ``c`` is a width constant of count ``n``."""
    cands = []
    if "count" in kinds:
        cands.append((float(n), float(n2)))
    if "ddof" in kinds and n > 1 and n2 > 1:
        cands.append((float(n - 1), float(n2 - 1)))
    if "sqrt" in kinds:
        cands.append((math.sqrt(n), math.sqrt(n2)))
    for full, red in cands:
        if op == "div" and _close(c, full, dtype):
            return red
        if op == "mul" and _close(c, 1.0 / full, dtype):
            return 1.0 / red
    return None


def width_constants(s: Any) -> dict:
    """``{(scope, equation index, operand index): reduced constant}`` for the
    analysed program (see the module docstring); raises where it cannot tell."""
    w = _Walker(s)
    jaxpr, consts = jp.sub(s.a.closed_jaxpr)
    n_var = len(s.a.leaf_paths)
    for v in jaxpr.invars[n_var:]:
        w.dep.add(((), v))
    w.walk(jaxpr, consts, ())
    for key, eqn, c in w.suspect:
        if key not in w.out:
            raise _cannot_tell(eqn, f"the constant {c:g}")
    return w.out


# ---------------------------------------------------------------- differential
def align(s: Any, closed_ref: Any) -> None:
    """Checks that ``closed_ref`` (the program traced at the reduced widths)
    is the analysed program with every value at the plan's reduced shape;
    raises ``Misaligned`` naming the first equation that differs."""
    full, _ = jp.sub(s.a.closed_jaxpr)
    ref, _ = jp.sub(closed_ref)
    if len(full.invars) != len(ref.invars):
        raise Misaligned("native semantics: the model at the reduced widths takes "
                         f"{len(ref.invars)} arrays, the pruned one {len(full.invars)}")
    for v, r in zip(full.invars, ref.invars):
        _same_shape(s, v, r, (), None)
    _align(s, full, ref, ())


def _same_shape(s: Any, v: Any, r: Any, scope: tuple, eqn: Any) -> None:
    want = s.new_shape(v, scope)
    have = tuple(getattr(r.aval, "shape", ()))
    if want != have:
        where = f" at `{_text(eqn)}`" if eqn is not None else ""
        raise Misaligned(
            f"native semantics: the model at the reduced widths computes shape {have} where "
            f"the plan gives {want}{where}; it does not prune like the plan (a config "
            "attribute such as num_heads or num_groups that encodes a width?)")


def _align(s: Any, full: Any, ref: Any, scope: tuple) -> None:
    if len(full.eqns) != len(ref.eqns):
        raise Misaligned(
            f"native semantics: the model at the reduced widths has {len(ref.eqns)} equations "
            f"where the pruned one has {len(full.eqns)} (scope {scope})")
    for i, (e, r) in enumerate(zip(full.eqns, ref.eqns)):
        if e.primitive.name != r.primitive.name or len(e.outvars) != len(r.outvars):
            raise Misaligned(f"native semantics: `{_text(r)}` at the reduced widths where the "
                             f"pruned model has `{_text(e)}`")
        for v, w in zip(e.outvars, r.outvars):
            _same_shape(s, v, w, scope, e)
        sub = scope + (i,)
        name = e.primitive.name
        if name in jp.CALL_PARAMS:
            _align(s, jp.call(e).jaxpr, jp.call(r).jaxpr, sub)
        elif name == "scan":
            _align(s, jp.scan(e).body.jaxpr, jp.scan(r).body.jaxpr, sub)
        elif name == "while":
            _align(s, jp.while_loop(e).cond.jaxpr, jp.while_loop(r).cond.jaxpr, sub + ("cond",))
            _align(s, jp.while_loop(e).body.jaxpr, jp.while_loop(r).body.jaxpr, sub + ("body",))
        elif name == "cond":
            for k, (b, c) in enumerate(zip(jp.cond_branches(e), jp.cond_branches(r))):
                _align(s, b.jaxpr, c.jaxpr, sub + (k,))


def trace_reference(fn: Callable, small: Any, args: tuple) -> Any:
    """The closed jaxpr of ``fn(small_variables, *args)`` (abstract values only)."""
    leaves, treedef = jax.tree.flatten(small)
    arg_leaves, arg_def = jax.tree.flatten(args)

    def flat(vl, al):
        return fn(jax.tree.unflatten(treedef, vl), *jax.tree.unflatten(arg_def, al))

    absd = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
    return jax.make_jaxpr(flat)([absd(x) for x in leaves], [absd(x) for x in arg_leaves])
