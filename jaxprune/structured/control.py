"""Primitives that hold sub-jaxprs: coupling rules and shrinking rules.

``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``
and ``remat`` are followed inline (their sub-jaxpr's variables live in a scope
of their own, so a cached sub-jaxpr called twice does not couple its call
sites); ``scan`` couples carries with themselves and the stacked axis of xs/ys
is frozen; ``cond`` couples every branch with the operands; ``while`` couples
the carry through body and condition. When shrinking, the bodies of
``custom_jvp``/``custom_vjp`` calls are inlined and differentiated directly
(their rules are traced at the full shapes and cannot be rebound; gradients
differ only where the rule departs from the body's derivative, e.g. ``relu``
at exactly 0), ``remat`` stays a
``jax.checkpoint`` and ``scan``/``cond``/``while`` are re-emitted with
``lax.scan``/``lax.switch``/``lax.while_loop`` over the shrunk bodies.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax

from jaxprune.structured import jaxpr_params as jp

__all__ = ["TRACE_CONTROL", "SHRINK_CONTROL"]


def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


# ---------------------------------------------------------------- coupling
def _call(t, eqn, scope, sub):
    """jit / custom_jvp_call / custom_vjp_call / remat / closed_call: inline."""
    body = jp.call(eqn)
    jaxpr = body.jaxpr
    _consts(t, body, sub)
    for outer, inner in zip(eqn.invars, jaxpr.invars):
        t.alias(inner, sub, outer, scope)  # constant operands stay known inside
        if not _is_lit(outer):
            t.unite_vars(outer, scope, inner, sub)
    t.walk(jaxpr, sub)
    for outer, inner in zip(eqn.outvars, jaxpr.outvars):
        t.alias(outer, scope, inner, sub)
        if not _is_lit(inner):
            t.unite_vars(outer, scope, inner, sub)


def _consts(t, body, sub):
    """Node ids and known values for a sub-jaxpr's constvars."""
    for v, c in zip(body.jaxpr.constvars, body.consts):
        t.axes(v, sub)
        t.values[(sub, v)] = c
    for v in body.jaxpr.constvars[len(body.consts):]:
        t.axes(v, sub)


def _scan(t, eqn, scope, sub):
    lay = jp.scan(eqn)
    body, nc, nk = lay.body.jaxpr, lay.num_consts, lay.num_carry
    for k, (outer, inner) in enumerate(zip(eqn.invars, body.invars)):
        if _is_lit(outer):
            continue
        if k < nc + nk:
            t.unite_vars(outer, scope, inner, sub)
        else:  # stacked xs
            _unite_stacked(t, outer, scope, inner, sub)
    t.walk(body, sub)
    for k, (outer, inner) in enumerate(zip(eqn.outvars, body.outvars)):
        if _is_lit(inner):
            continue
        if k < nk:
            t.unite_vars(outer, scope, inner, sub)
            if not _is_lit(eqn.invars[nc + k]):
                t.unite_vars(eqn.invars[nc + k], scope, inner, sub)
        else:  # stacked ys
            _unite_stacked(t, outer, scope, inner, sub)


def _unite_stacked(t, outer, scope, inner, sub):
    """A scanned array: outer axis 0 is the (frozen) scan axis, the rest are
    the body's axes."""
    oa, ia = t.axes(outer, scope), t.axes(inner, sub)
    t.uf.freeze(oa[0], "scanned axis")
    for p_, q in zip(oa[1:], ia):
        t.uf.union(p_, q)


def _cond(t, eqn, scope, sub):
    t.freeze_var(eqn.invars[0], scope, "cond index")
    for b, branch in enumerate(jp.cond_branches(eqn)):
        bsub = sub + (b,)
        jaxpr = branch.jaxpr
        for outer, inner in zip(eqn.invars[1:], jaxpr.invars):
            if not _is_lit(outer):
                t.unite_vars(outer, scope, inner, bsub)
        t.walk(jaxpr, bsub)
        for outer, inner in zip(eqn.outvars, jaxpr.outvars):
            if not _is_lit(inner):
                t.unite_vars(outer, scope, inner, bsub)


def _while(t, eqn, scope, sub):
    lay = jp.while_loop(eqn)
    cn, bn = lay.cond_nconsts, lay.body_nconsts
    cj, bj = lay.cond.jaxpr, lay.body.jaxpr
    cconsts, bconsts, carry = eqn.invars[:cn], eqn.invars[cn:cn + bn], eqn.invars[cn + bn:]
    csub, bsub = sub + ("cond",), sub + ("body",)
    for outer, inner in zip(list(cconsts) + list(carry), cj.invars):
        if not _is_lit(outer):
            t.unite_vars(outer, scope, inner, csub)
    for outer, inner in zip(list(bconsts) + list(carry), bj.invars):
        if not _is_lit(outer):
            t.unite_vars(outer, scope, inner, bsub)
    t.walk(cj, csub)
    t.walk(bj, bsub)
    for k, inner in enumerate(bj.outvars):
        if not _is_lit(inner):
            t.unite_vars(eqn.outvars[k], scope, inner, bsub)
        if not _is_lit(carry[k]):
            t.unite_vars(eqn.outvars[k], scope, carry[k], scope)


# ---------------------------------------------------------------- shrinking
def _shrink_call(wrap: Callable | None = None):
    def rule(s, eqn, invals, scope, sub):
        fn = s.sub_eval(jp.call(eqn), sub)
        if wrap is not None:
            fn = wrap(eqn, fn)
        return list(fn(*invals))
    return rule


def _remat_wrap(eqn, fn):
    return jax.checkpoint(lambda *a: fn(*a), prevent_cse=eqn.params.get("prevent_cse", True),
                          policy=eqn.params.get("policy"))


def _shrink_scan(s, eqn, invals, scope, sub):
    lay = jp.scan(eqn)
    nc, nk = lay.num_consts, lay.num_carry
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    body = s.sub_eval(lay.body, sub)

    def step(carry, x):
        outs = body(*consts, *carry, *x)
        return list(outs[:nk]), list(outs[nk:])

    carry, ys = lax.scan(step, list(init), list(xs), length=lay.length,
                         reverse=lay.reverse, unroll=lay.unroll)
    return list(carry) + list(ys)


def _shrink_cond(s, eqn, invals, scope, sub):
    branches = [s.sub_eval(b, sub + (k,)) for k, b in enumerate(jp.cond_branches(eqn))]
    return list(lax.switch(invals[0], [lambda *a, f=f: list(f(*a)) for f in branches], *invals[1:]))


def _shrink_while(s, eqn, invals, scope, sub):
    lay = jp.while_loop(eqn)
    cn, bn = lay.cond_nconsts, lay.body_nconsts
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    cond = s.sub_eval(lay.cond, sub + ("cond",))
    body = s.sub_eval(lay.body, sub + ("body",))
    return list(lax.while_loop(lambda c: cond(*cconsts, *c)[0],
                               lambda c: list(body(*bconsts, *c)), list(init)))


#: Trace rules of the primitives that hold sub-jaxprs (calls, ``scan``, ``cond``, ``while``).
TRACE_CONTROL: dict[str, Any] = {name: _call for name in jp.CALL_PARAMS}
TRACE_CONTROL.update({"scan": _scan, "cond": _cond, "while": _while})

#: Shrink rules of the same primitives: re-emit the sub-jaxprs at the reduced shapes.
SHRINK_CONTROL: dict[str, Callable] = {
    name: _shrink_call(_remat_wrap if name in ("remat2", "checkpoint") else None)
    for name in jp.CALL_PARAMS}
SHRINK_CONTROL.update({"scan": _shrink_scan, "cond": _shrink_cond, "while": _shrink_while})
