"""Masked-semantics rules for the primitives that combine removed channels:
reductions and contractions over a pruned axis add the removed blocks'
contribution to the kept result (weighted ``|R|`` per uniform atom); values born
in the program (``iota``, random bits) and loops (``scan``/``while``/``cond``,
whose carries keep one block structure) are handled here too. See ``masked.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.blocks import (UNKNOWN, Block, Val, atom_set, atoms_of, bind_rule,
                                        block_shape, coerce, listify, masked_error, restrict,
                                        split_full, subsets)
from jaxprune.structured.trace import StructuredPruningError

__all__ = ["GHOST_RULES"]

# ---------------------------------------------------------------- reductions
_COMBINE = {"reduce_sum": jnp.add, "reduce_max": jnp.maximum, "reduce_min": jnp.minimum,
            "reduce_or": jnp.logical_or, "reduce_and": jnp.logical_and}


def _weight(s: Any, atoms: frozenset, modes: dict) -> int:
    w = 1
    for a in atoms:
        if modes.get(a, "u") == "u":
            w *= len(s.R.removed(a))
    return w


def _reduce(s: Any, eqn: Any, invals: list, scope: tuple, sub: tuple) -> list:
    name = eqn.primitive.name
    x, xv = invals[0], eqn.invars[0]
    main = listify(eqn, bind_rule(s, eqn)(s, eqn, [x.main], scope, sub))[0]
    per_axis = atoms_of(s, xv, scope)
    axes = {a % max(len(per_axis), 1) for a in eqn.params["axes"]}
    red = frozenset().union(*[per_axis[k] for k in axes]) if per_axis else frozenset()
    rest = frozenset().union(*[a for k, a in enumerate(per_axis) if k not in axes]) \
        if per_axis else frozenset()
    if not red and not x.blocks:
        return [Val(main)]
    if red & rest:
        raise masked_error(eqn, "reduces an axis whose channels also index another of its axes")
    if red and name not in _COMBINE:
        raise masked_error(eqn, "reduces over a pruned axis (its result over the full width is "
                          "not a function of the kept channels and a sum of removed ones)")
    combine = _COMBINE.get(name)
    out_var = eqn.outvars[0]
    acc: dict = {}  # S -> (modes, value | UNKNOWN)

    def add(S, modes, value):
        if S not in acc:
            acc[S] = (modes, value)
            return
        m0, v0 = acc[S]
        if v0 is UNKNOWN or value is UNKNOWN:
            acc[S] = (m0, UNKNOWN)
            return
        m = {a: ("e" if "e" in (m0.get(a), modes.get(a)) else "u") for a in S}
        acc[S] = (m, combine(coerce(s, v0, out_var, scope, m0, m),
                             coerce(s, value, out_var, scope, modes, m)))

    for K, b in x.blocks.items():
        S, T = K & rest, K & red
        modes = dict(b.modes)
        if b.value is UNKNOWN:
            if T:
                raise masked_error(eqn, "would sum removed channels whose values are not carried "
                                  "(random bits drawn only for kept channels, ...)")
            add(S, {a: modes[a] for a in S}, UNKNOWN)
            continue
        part = eqn.primitive.bind(b.value, **eqn.params)
        if name == "reduce_sum" and T:
            part = part * jnp.asarray(_weight(s, T, modes), part.dtype)
        add(S, {a: modes[a] for a in S}, part)
    if name != "reduce_sum" and red:
        # Regions that are absent are zeros, and zeros take part in max/min/and/or.
        for S in [frozenset()] + [K & rest for K in x.blocks]:
            if any((S | T) not in x.blocks for T in subsets(red)):
                if S in acc or not S:
                    modes = acc[S][0] if S in acc else {}
                    # a scalar zero broadcasts (and stays valid inside shard_map bodies)
                    add(S, modes, np.zeros((), out_var.aval.dtype))
    main_part = acc.pop(frozenset(), None)
    if main_part is not None:
        main = combine(main, main_part[1])
    out_atoms = atom_set(s, out_var, scope)
    return [Val(main, {S: Block(restrict(m, out_atoms), v) for S, (m, v) in acc.items()})]


# ---------------------------------------------------------------- contractions
def _bilinear(s: Any, eqn: Any, invals: list, scope: tuple, sub: tuple,
              lhs_batch: list, rhs_batch: list, lhs_con: list, rhs_con: list,
              grouped: bool) -> list:
    """``dot_general`` / ``conv_general_dilated``: every pair of regions that
    agree on the batch and contracted atoms adds its product, counted
    ``|R|`` times per uniform contracted atom."""
    L, R = invals[:2]
    lv, rv = eqn.invars[:2]
    main = listify(eqn, bind_rule(s, eqn)(s, eqn, [L.main, R.main] + [v.main for v in invals[2:]],
                                            scope, sub))[0]
    if not L.blocks and not R.blocks:
        return [Val(main)]
    la, ra = atoms_of(s, lv, scope), atoms_of(s, rv, scope)
    C = frozenset().union(*[la[k] for k in lhs_con], *[ra[k] for k in rhs_con])
    B = frozenset().union(*[la[k] for k in lhs_batch], *[ra[k] for k in rhs_batch])
    BC = B | C
    out_var = eqn.outvars[0]
    out_atoms = atom_set(s, out_var, scope)
    acc: dict = {}
    for kl in [frozenset()] + list(L.blocks):
        for kr in [frozenset()] + list(R.blocks):
            if (not kl and not kr) or (kl & BC) != (kr & BC):
                continue
            bl = L.blocks[kl] if kl else None
            br = R.blocks[kr] if kr else None
            T = kl & C
            S = (kl | kr) - T
            if grouped:
                raise masked_error(eqn, "is a grouped convolution over channels whose removed part "
                                  "is not zero")
            vals = [b.value if b is not None else None for b in (bl, br)]
            if UNKNOWN in vals:
                if T:
                    raise masked_error(eqn, "would contract removed channels whose values are not "
                                      "carried (random bits drawn only for kept channels, ...)")
                acc[S] = ({a: "u" for a in S}, UNKNOWN)
                continue
            modes = {a: "u" for a in kl | kr}
            for b in (bl, br):
                for a, m in (b.modes if b is not None else ()):
                    if m == "e":
                        modes[a] = "e"
            x = coerce(s, bl.value, lv, scope, dict(bl.modes), modes) if bl else L.main
            y = coerce(s, br.value, rv, scope, dict(br.modes), modes) if br else R.main
            term = eqn.primitive.bind(x, y, **eqn.params)
            if T:
                term = term * jnp.asarray(_weight(s, T, modes), term.dtype)
            mS = {a: modes[a] for a in S}
            if S in acc:
                m0, v0 = acc[S]
                if v0 is UNKNOWN:
                    continue
                m = {a: ("e" if "e" in (m0[a], mS[a]) else "u") for a in S}
                acc[S] = (m, coerce(s, v0, out_var, scope, m0, m)
                          + coerce(s, term, out_var, scope, mS, m))
            else:
                acc[S] = (mS, term)
    extra = acc.pop(frozenset(), None)
    if extra is not None:
        main = main + extra[1]
    return [Val(main, {S: Block(restrict(m, out_atoms), v) for S, (m, v) in acc.items()})]


def _dot_general(s, eqn, invals, scope, sub):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return _bilinear(s, eqn, invals, scope, sub, list(lb), list(rb), list(lc), list(rc), False)


def _conv(s, eqn, invals, scope, sub):
    dn = eqn.params["dimension_numbers"]
    grouped = eqn.params.get("feature_group_count", 1) != 1 or \
        eqn.params.get("batch_group_count", 1) != 1
    if grouped and not invals[0].blocks and not invals[1].blocks:
        grouped = False
    if grouped:
        # A pair of non-zero blocks would be needed; a zero partner contributes nothing.
        L, R = invals[:2]
        la, ra = atoms_of(s, eqn.invars[0], scope), atoms_of(s, eqn.invars[1], scope)
        C = la[dn.lhs_spec[1]] | ra[dn.rhs_spec[1]]
        if not any((kl & C) == (kr & C) and (kl or kr)
                   for kl in [frozenset()] + list(L.blocks) for kr in [frozenset()] + list(R.blocks)):
            grouped = False
            return [Val(listify(eqn, bind_rule(s, eqn)(
                s, eqn, [v.main for v in invals], scope, sub))[0])]
    return _bilinear(s, eqn, invals, scope, sub, [], [], [dn.lhs_spec[1]], [dn.rhs_spec[1]], grouped)



def _shard_map(s, eqn, invals, scope, sub):
    """A ``shard_map`` body runs on per-device arrays: removed blocks cannot
    cross it, so they must be zero on the way in and come out zero."""
    if any(v.blocks for v in invals):
        raise masked_error(eqn, "receives removed channels that are not zero")
    inner = s.sub_eval

    def zero_blocks(sub_, scope_):
        s.sub_eval = inner  # only the body itself: calls inside it carry blocks as usual
        body = inner(sub_, scope_)

        def run(*args):
            outs = body(*[Val(a) for a in args])
            if any(o.blocks for o in outs):
                raise masked_error(eqn, "returns removed channels that are not zero")
            return [o.main for o in outs]
        return run
    s.sub_eval = zero_blocks
    try:
        outs = bind_rule(s, eqn)(s, eqn, [v.main for v in invals], scope, sub)
    finally:
        s.sub_eval = inner
    return [Val(o) for o in listify(eqn, outs)]


# ---------------------------------------------------------------- values born in the program
def _iota(s, eqn, invals, scope, sub):
    full = eqn.primitive.bind(**eqn.params)
    return [split_full(s, full, eqn.outvars[0], scope, concrete=False)]


def _random_bits(s, eqn, invals, scope, sub):
    atoms = atom_set(s, eqn.outvars[0], scope)
    if atoms and s.random_bits == "exact":  # the masked model's very bits, removed ones too
        full = eqn.primitive.bind(*[v.main for v in invals], **eqn.params)
        return [split_full(s, full, eqn.outvars[0], scope, concrete=False)]
    main = listify(eqn, bind_rule(s, eqn)(s, eqn, [v.main for v in invals], scope, sub))[0]
    return [Val(main, {S: Block(tuple((a, "u") for a in sorted(S)), UNKNOWN)
                       for S in subsets(atoms)})]



# ---------------------------------------------------------------- control flow
def _struct(v: Val) -> dict:
    return {k: (b.modes, b.value is UNKNOWN) for k, b in v.blocks.items()}


def _merge(a: dict, b: dict) -> dict:
    """Block structure covering both (explicit wins over uniform, unknown wins)."""
    out = {}
    for k in set(a) | set(b):
        modes: dict = {}
        unknown = False
        for st in (a, b):
            if k in st:
                m, u = st[k]
                unknown = unknown or u
                for at, mo in m:
                    modes[at] = "e" if "e" in (mo, modes.get(at)) else "u"
        out[k] = (tuple(sorted(modes.items())), unknown)
    return out


def _conform(s: Any, v: Val, var: Any, scope: tuple, struct: dict) -> Val:
    """``v`` laid out with exactly the blocks of ``struct`` (zeros where absent)."""
    if set(v.blocks) - set(struct):
        raise StructuredPruningError("internal: loop carry gained removed blocks twice")
    blocks = {}
    for k, (modes, unknown) in struct.items():
        if unknown:
            blocks[k] = Block(modes, UNKNOWN)
            continue
        b = v.blocks.get(k)
        if b is None:
            val = jnp.zeros(block_shape(s, var, scope, dict(modes)), var.aval.dtype)
        elif b.value is UNKNOWN:
            raise StructuredPruningError("internal: unknown block in a loop carry")
        else:
            val = coerce(s, b.value, var, scope, dict(b.modes), dict(modes))
        blocks[k] = Block(modes, val)
    return Val(v.main, blocks)


def _abstract(v: Val) -> Val:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), v)


def _fixed_carry(s, scope, sub_scope, carry_vars, init, step) -> list:
    """Grows the carries' block structure until one step maps it into itself."""
    carry = list(init)
    for _ in range(8):
        outs = step([_abstract(c) for c in carry])
        structs = [_merge(_struct(c), _struct(o)) for c, o in zip(carry, outs)]
        if all(st == _struct(c) for c, st in zip(carry, structs)):
            return carry
        carry = [_conform(s, c, v, scope, st) for c, v, st in zip(carry, carry_vars, structs)]
    raise StructuredPruningError("internal: loop carry blocks did not settle")


def _scan(s, eqn, invals, scope, sub):
    lay = jp.scan(eqn)
    nc, nk = lay.num_consts, lay.num_carry
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    body = s.sub_eval(lay.body, sub)
    inner = lay.body.jaxpr.invars
    carry_vars = eqn.invars[nc:nc + nk]

    def first(v):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), v)

    def probe(carry):
        return jax.eval_shape(lambda c, x: body(*consts, *c, *x)[:nk], carry,
                              [first(x) for x in xs])

    init = _fixed_carry(s, scope, sub, carry_vars, [Val(c.main, dict(c.blocks)) for c in init], probe)
    structs = [_struct(c) for c in init]

    def step(carry, x):
        outs = body(*consts, *carry, *x)
        new = [_conform(s, o, v, sub, st) for o, v, st in
               zip(outs[:nk], inner[nc:nc + nk], structs)]
        return new, list(outs[nk:])

    carry, ys = lax.scan(step, list(init), list(xs), length=lay.length, reverse=lay.reverse,
                         unroll=lay.unroll)
    return list(carry) + list(ys)


def _while(s, eqn, invals, scope, sub):
    lay = jp.while_loop(eqn)
    cn, bn = lay.cond_nconsts, lay.body_nconsts
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    cond = s.sub_eval(lay.cond, sub + ("cond",))
    body = s.sub_eval(lay.body, sub + ("body",))
    carry_vars = eqn.invars[cn + bn:]
    init = _fixed_carry(s, scope, sub, carry_vars, list(init),
                        lambda c: jax.eval_shape(lambda c: body(*bconsts, *c), c))
    structs = [_struct(c) for c in init]

    def body_fn(c):
        outs = body(*bconsts, *c)
        return [_conform(s, o, v, scope, st) for o, v, st in zip(outs, carry_vars, structs)]

    return list(lax.while_loop(lambda c: cond(*cconsts, *c)[0].main, body_fn, list(init)))


def _cond(s, eqn, invals, scope, sub):
    branches = [s.sub_eval(b, sub + (k,)) for k, b in enumerate(jp.cond_branches(eqn))]
    ops = invals[1:]
    shapes = [jax.eval_shape(lambda *a, f=f: f(*a), *ops) for f in branches]
    structs = []
    for k in range(len(eqn.outvars)):
        merged: dict = {}
        for outs in shapes:
            merged = _merge(merged, _struct(outs[k]))
        structs.append(merged)
    fns = [lambda *a, f=f: [_conform(s, o, v, scope, st)
                            for o, v, st in zip(f(*a), eqn.outvars, structs)]
           for f in branches]
    return list(lax.switch(invals[0].main, fns, *ops))


#: Primitive name -> rule that combines removed blocks (others act block by block).
GHOST_RULES: dict = {name: _reduce for name in
                     "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                     "reduce_xor argmax argmin".split()}
GHOST_RULES.update({
    "shard_map": _shard_map,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "iota": _iota,
    "random_bits": _random_bits,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
})


