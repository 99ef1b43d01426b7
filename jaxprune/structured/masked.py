"""Masked semantics: the shrunk forward computes exactly the masked dense model.

The masked dense model is ``apply_fn(zero_removed(variables, plan), x)``: the
removed channels still exist, their parameters are zero, and every reduction
over a pruned axis (a mean in a norm, a softmax's sum, a contraction) still
runs over the full width. The shrunk forward reproduces it without computing
at the full width: each value is split by *region* (for every set ``S`` of
pruned atoms, the entries removed exactly along the atoms of ``S``). The kept
region is the ordinary shrunk array; every other region is a *block* that is

* absent: known to be zero (removed parameters are zero, ``relu(0) = 0``, ...);
* ``u`` (uniform) along an atom: all removed channels of that atom hold the
  same value (they are interchangeable: coupled channels are permuted alike by
  every op), so one representative is carried at size 1 and counts ``|R|``
  times in a sum (``x - mean`` after a zero channel is ``-mean``);
* ``e`` (explicit) along an atom: the removed channels are carried one by one
  (a constant table, an ``iota``, an input feature with ``prunable_io``);
* ``UNKNOWN``: not carried (random bits drawn only for the kept channels);
  an error naming the equation if it ever reaches a kept value.

Per-index ops (element-wise, reshape, transpose, broadcast, slice, ...) act on
each block; reductions (``reduce_*``) and contractions (``dot_general``,
``conv_general_dilated``) add the blocks' contributions to the kept result, so
``jnp.mean``/``jnp.var`` over the full width, LayerNorm, RMSNorm, GroupNorm,
weight standardisation and softmax over a pruned axis all come out exactly as
in the masked model. Zero blocks cost nothing: a model without such ops runs
exactly the plain shrunk program. Assumes finite values (``0 * x = 0``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.blocks import (UNKNOWN, ZERO, Block, Regions, Val, View, atom_set,
                                        bind_rule, block_of, block_shape, coerce, is_lit,
                                        is_zero_literal, listify, masked_error, modes_for,
                                        restrict, split_full, subsets, varying_like, wrap_input,
                                        zeros_block)
from jaxprune.structured.masked_rules import GHOST_RULES

__all__ = ["Val", "Block", "UNKNOWN", "Regions", "eval_jaxpr", "wrap_input", "split_full",
           "GHOST_RULES", "ZERO_PRESERVING", "PER_INDEX"]

# ---------------------------------------------------------------- generic per-index rule
#: Ops that act on every index of a coupled axis independently and map zeros to zeros.
ZERO_PRESERVING = frozenset("""
reshape transpose broadcast_in_dim squeeze expand_dims slice dynamic_slice gather concatenate
split rev copy copy_p convert_element_type reduce_precision stop_gradient sharding_constraint
mesh_cast optimization_barrier cumsum cumprod cummax cummin sort reduce_window_sum
reduce_window_max reduce_window_min dynamic_update_slice stack unstack tile psum pmean pmax
pmin all_gather ppermute all_to_all pbroadcast psum_scatter reduce_scatter neg
real imag conj select_and_gather_add bitcast_convert_type rev pvary psum_invariant
all_gather_invariant scatter scatter-add scatter_add scatter-sub scatter_sub scatter-mul
scatter_mul scatter-min scatter_min scatter-max scatter_max
""".split())
#: Ops that act on every index of a coupled axis independently.
PER_INDEX = ZERO_PRESERVING | frozenset("pad cumlogsumexp top_k call_hi_primitive".split())


def _generic(s: Any, eqn: Any, invals: list, scope: tuple, sub: tuple) -> list:
    from jaxprune.structured.rules import ELEMENTWISE, TRACE_RULES
    name = eqn.primitive.name
    outs = listify(eqn, bind_rule(s, eqn)(s, eqn, [v.main for v in invals], scope, sub))
    const = _const_out(eqn, invals) if len(outs) == 1 else None
    in_sets = [atom_set(s, v, scope) for v in eqn.invars]
    out_sets = [atom_set(s, v, scope) for v in eqn.outvars]
    all_in, all_out = frozenset().union(*in_sets), frozenset().union(*out_sets)
    if not all_in and not all_out:
        return [Val(o, const=const) for o in outs]
    elementwise = name in ELEMENTWISE
    # A primitive without a coupling rule was coupled by the equivariance check:
    # it acts on each kept index alone, so it acts on each block alone too.
    if not elementwise and name not in PER_INDEX and name in TRACE_RULES:
        raise masked_error(eqn, "touches a pruned axis and jaxprune does not know how it combines "
                          "the removed channels")
    if (all_in - all_out) and name != "slice":  # a slice may leave out whole removed parts
        raise masked_error(eqn, "drops a pruned axis")
    has_blocks = any(v.blocks for v in invals)
    if not has_blocks and not (all_out - all_in) and name in ZERO_PRESERVING:
        return [Val(o, const=const) for o in outs]
    if name == "pad" and not has_blocks and is_zero_literal(eqn.invars[1]):
        return [Val(o, const=const) for o in outs]
    results: list[dict] = [{} for _ in outs]
    for S in subsets(all_out):
        targets = [j for j, oa in enumerate(out_sets) if S <= oa]
        if not targets:
            continue
        if name in ("concatenate", "split") and _along_parts(s, eqn, scope, S):
            _parts_block(s, eqn, invals, scope, S, results)
            continue
        modes = modes_for(S, invals)
        got = [block_of(s, v, var, scope, modes) for v, var in zip(invals, eqn.invars)]
        blocked = [i for i, (var, a) in enumerate(zip(eqn.invars, in_sets)) if S & a]
        zero = [g is ZERO or (i not in blocked and invals[i].const is not None
                              and np.all(invals[i].const == 0)) for i, g in enumerate(got)]
        if _annihilated(name, zero, got):
            continue
        considered = blocked or list(range(len(got)))  # a broadcast reads only the main
        if considered and all(zero[i] for i in considered):
            if name in ZERO_PRESERVING:
                continue
            if elementwise:
                c = _const_of_zeros(eqn, got, invals)
                if c is not None:
                    if np.all(c == 0):
                        continue
                    for j in targets:
                        o = eqn.outvars[j]
                        val = varying_like(jnp.broadcast_to(jnp.asarray(c, o.aval.dtype),
                                                            block_shape(s, o, scope, modes)), o)
                        results[j][S] = Block(restrict(modes, out_sets[j]), val)
                    continue
        if any(g is UNKNOWN for g in got):
            for j in targets:
                results[j][S] = Block(restrict(modes, out_sets[j]), UNKNOWN)
            continue
        got = [zeros_block(s, var, scope, modes) if g is ZERO else g
               for g, var in zip(got, eqn.invars)]
        res = listify(eqn, bind_rule(s, eqn)(View(s, modes), eqn, got, scope, sub))
        for j in targets:
            if all(res[j].shape):
                results[j][S] = Block(restrict(modes, out_sets[j]), res[j])
    return [Val(o, r, const) for o, r in zip(outs, results)]


def _annihilated(name: str, zero: list, got: list) -> bool:
    if name == "mul" or name == "and":
        return any(zero)
    if name == "select_n":
        return all(zero[1:])
    return False


_CONST_CACHE: dict = {}


def _const_of_zeros(eqn: Any, got: list, invals: list) -> Any:
    """f(0, ..., constants): the value an element-wise op gives where every
    non-scalar operand is zero (None if another operand is not a constant)."""
    args = []
    for var, g, v in zip(eqn.invars, got, invals):
        if g is ZERO:
            args.append(np.zeros((), var.aval.dtype))
        elif v.const is not None:
            args.append(np.asarray(v.const, var.aval.dtype))
        else:
            return None
    return _fold(eqn, args)


# Ops that pass a constant value through unchanged (the value is uniform).
_CONST_PASS = frozenset("""broadcast_in_dim reshape squeeze expand_dims transpose pvary copy
copy_p sharding_constraint mesh_cast""".split())


def _const_out(eqn: Any, invals: list) -> Any:
    """The constant an op returns when its operands are constants, else None."""
    from jaxprune.structured.rules import ELEMENTWISE
    name = eqn.primitive.name
    if name in _CONST_PASS and invals and invals[0].const is not None:
        return invals[0].const
    if name in ELEMENTWISE and not eqn.primitive.multiple_results and invals \
            and all(v.const is not None for v in invals):
        out = _fold(eqn, [np.asarray(v.const, var.aval.dtype) for v, var in zip(invals, eqn.invars)])
        return out.item() if out.ndim == 0 else None
    return None


def _fold(eqn: Any, args: list) -> np.ndarray:
    """``eqn``'s primitive on concrete scalars (cached)."""
    key = (eqn.primitive.name, tuple(sorted((k, str(v)) for k, v in eqn.params.items())),
           tuple((a.dtype.str, a.tobytes()) for a in args))
    if key not in _CONST_CACHE:
        with jax.ensure_compile_time_eval():
            out = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **eqn.params)
        out = out[0] if eqn.primitive.multiple_results else out
        _CONST_CACHE[key] = np.asarray(out)
    return _CONST_CACHE[key]


def _along_parts(s: Any, eqn: Any, scope: tuple, S: frozenset) -> bool:
    """Does region ``S`` remove atoms along the concatenated / split axis?"""
    if eqn.primitive.name == "concatenate":
        whole, axis = eqn.outvars[0], eqn.params["dimension"]
    else:
        whole, axis = eqn.invars[0], eqn.params["axis"]
    return bool(S & s.R.axis_atoms(s.t.axes(whole, scope)[axis]))


def _parts_block(s: Any, eqn: Any, invals: list, scope: tuple, S: frozenset, results: list) -> None:
    """Region ``S`` removes atoms of one part of a concatenation: the block is that part's."""
    modes = modes_for(S, invals)
    if eqn.primitive.name == "concatenate":
        for v, var in zip(invals, eqn.invars):
            if S <= atom_set(s, var, scope):
                b = v.blocks.get(S)
                if b is not None:
                    results[0][S] = Block(restrict(modes, atom_set(s, eqn.outvars[0], scope)),
                                          coerce(s, b.value, var, scope, dict(b.modes), modes)
                                          if b.value is not UNKNOWN else UNKNOWN)
        return
    b = invals[0].blocks.get(S)
    if b is None:
        return
    for j, var in enumerate(eqn.outvars):
        if S <= atom_set(s, var, scope):
            results[j][S] = Block(restrict(modes, atom_set(s, var, scope)),
                                  coerce(s, b.value, eqn.invars[0], scope, dict(b.modes), modes)
                                  if b.value is not UNKNOWN else UNKNOWN)



# ---------------------------------------------------------------- evaluation
def eval_jaxpr(s: Any, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], scope: tuple) -> list:
    """Evaluates ``jaxpr`` on ``Val`` values (see the module docstring)."""
    env: dict = {}

    def read(v):
        if is_lit(v):
            return Val(v.val, const=np.asarray(v.val).item() if np.ndim(v.val) == 0 else None)
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = split_full(s, c, v, scope, concrete=not isinstance(c, jax.core.Tracer))
    for v, x in zip(jaxpr.invars, args):
        env[v] = x if isinstance(x, Val) else Val(x)
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        rule = GHOST_RULES.get(name)
        if rule is not None:
            outs = rule(s, eqn, invals, scope, scope + (i,))
        elif name in jp.CALL_PARAMS:
            outs = listify(eqn, s.rule(name)(s, eqn, invals, scope, scope + (i,)))
        else:
            outs = _generic(s, eqn, invals, scope, scope + (i,))
        for v, x in zip(eqn.outvars, outs):
            if type(v).__name__ != "DropVar":
                env[v] = x
    return [read(v) for v in jaxpr.outvars]
