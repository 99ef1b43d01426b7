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

import itertools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.trace import StructuredPruningError

__all__ = ["Val", "Block", "UNKNOWN", "Regions", "eval_jaxpr", "wrap_input", "split_full",
           "GHOST_RULES", "ZERO_PRESERVING", "PER_INDEX"]


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: Marks a removed block whose values are not carried (an error if it reaches a kept value).
UNKNOWN = _Unknown()
_ZERO = object()  # a block known to be zero (internal marker while evaluating)


class Block(NamedTuple):
    """One removed region of a value: ``modes`` ((atom, 'u'|'e'), ...) and its array."""

    modes: tuple
    value: Any


@jax.tree_util.register_pytree_node_class
class Val:
    """A value of the masked dense model: the kept array and the removed blocks
    (``{frozenset(atoms): Block}``; an absent key is a zero block)."""

    __slots__ = ("main", "blocks")

    def __init__(self, main: Any, blocks: dict | None = None) -> None:
        self.main = main
        self.blocks = blocks or {}

    def tree_flatten(self):
        keys = sorted(self.blocks, key=lambda k: tuple(sorted(k)))
        arrays = [self.main] + [self.blocks[k].value for k in keys
                                if self.blocks[k].value is not UNKNOWN]
        aux = tuple((k, self.blocks[k].modes, self.blocks[k].value is UNKNOWN) for k in keys)
        return arrays, aux

    @classmethod
    def tree_unflatten(cls, aux, arrays):
        it = iter(arrays)
        main = next(it)
        blocks = {k: Block(m, UNKNOWN if unk else next(it)) for k, m, unk in aux}
        return cls(main, blocks)

    def structure(self) -> tuple:
        return tuple(sorted((tuple(sorted(k)), b.modes, b.value is UNKNOWN)
                            for k, b in self.blocks.items()))


def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _error(eqn: Any, why: str) -> StructuredPruningError:
    text = str(eqn).replace("\n", " ")
    text = text if len(text) < 160 else text[:157] + "..."
    return StructuredPruningError(
        f"masked semantics: primitive '{eqn.primitive.name}' in `{text}` {why}. The shrunk "
        "model cannot reproduce zero_removed(variables, plan) exactly here; use "
        "semantics='native', or keep this axis (ignore=).")


# ---------------------------------------------------------------- regions
class Regions:
    """Index bookkeeping of regions (kept / removed per atom) of every axis."""

    def __init__(self, uf: Any, keep: dict) -> None:
        self.uf, self.keep = uf, keep
        self.pruned = frozenset(a for a, k in keep.items() if len(k) < uf.size[uf.find(a)])
        self._under: dict = {}
        self._axis: dict = {}
        self._region: dict = {}
        self._pos: dict = {}

    def removed(self, atom: int) -> np.ndarray:
        return np.setdiff1d(np.arange(self.uf.size[atom]), self.keep[atom])

    def under(self, node: int) -> frozenset:
        r = self.uf.find(node)
        got = self._under.get(r)
        if got is None:
            got = self._under[r] = frozenset(self.uf.atoms(r))
        return got

    def axis_atoms(self, node: int) -> frozenset:
        """Pruned atoms along one axis."""
        r = self.uf.find(node)
        got = self._axis.get(r)
        if got is None:
            got = self._axis[r] = self.under(r) & self.pruned
        return got

    def region(self, node: int, modes: dict) -> np.ndarray:
        """Original indices (sorted) of the entries of axis ``node`` in the
        region removed along the atoms of ``modes`` (restricted to this axis)."""
        r = self.uf.find(node)
        mine = tuple(sorted((a, m) for a, m in modes.items() if a in self.under(r)))
        key = (r, mine)
        got = self._region.get(key)
        if got is None:
            got = self._region[key] = self._region_of(r, dict(mine))
        return got

    def _region_of(self, r: int, modes: dict) -> np.ndarray:
        uf = self.uf
        st = uf.struct.get(r)
        if st is None:
            m = modes.get(r)
            if m is None:
                return np.asarray(self.keep.get(r, np.arange(uf.size[r])), np.int64)
            rem = self.removed(r)
            return rem if m == "e" else rem[:1]
        kind, kids = st
        if kind == "sum":
            parts, offset = [], 0
            for c in kids:
                if set(modes) <= self.under(c):
                    parts.append(self.region(c, modes) + offset)
                offset += uf.size[uf.find(c)]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        idx = np.zeros((1,), np.int64)
        for c in kids:
            sub = self.region(c, modes)
            idx = (idx[:, None] * uf.size[uf.find(c)] + sub[None, :]).reshape(-1)
        return idx

    def positions(self, node: int, frm: dict, to: dict) -> np.ndarray:
        """For each entry of region ``to``: its position in region ``frm``
        (``frm`` is ``to`` with some atoms uniform instead of explicit)."""
        r = self.uf.find(node)
        under = self.under(r)
        f = tuple(sorted((a, m) for a, m in frm.items() if a in under))
        t = tuple(sorted((a, m) for a, m in to.items() if a in under))
        key = (r, f, t)
        got = self._pos.get(key)
        if got is not None:
            return got
        dst, src = self.region(r, to), self.region(r, frm)
        if f == t:
            got = np.arange(len(dst))
        else:
            atoms = sorted(under)
            labels = np.stack([self.uf.labels(r, a) for a in atoms], axis=1)
            lookup = {tuple(row): i for i, row in enumerate(labels)}
            rep = {a: int(self.removed(a)[0]) for a, m in f if m == "u"}
            cols = [(j, rep[a]) for j, a in enumerate(atoms) if a in rep]
            out = []
            for i in dst:
                row = labels[i].copy()
                for j, v in cols:
                    if row[j] >= 0:
                        row[j] = v
                out.append(int(np.searchsorted(src, lookup[tuple(row)])))
            got = np.asarray(out, np.int64)
        self._pos[key] = got
        return got


class _View:
    """The shrinker seen through one region: every axis has that region's extent,
    so the ordinary shrink rules compute a block."""

    def __init__(self, s: Any, modes: dict) -> None:
        self.s, self.t, self.a, self.modes = s, s.t, s.a, modes
        self.counts: dict = {}

    def kept(self, node: int) -> np.ndarray:
        return self.s.R.region(node, self.modes)

    def new_shape(self, var: Any, scope: tuple) -> tuple:
        return tuple(len(self.kept(n)) for n in self.t.axes(var, scope))

    def old_shape(self, var: Any) -> tuple:
        return self.s.old_shape(var)

    def cut(self, x: Any, var: Any, scope: tuple) -> Any:
        for axis, node in enumerate(self.t.axes(var, scope)):
            idx = self.kept(node)
            if len(idx) != x.shape[axis]:
                x = jnp.take(x, jnp.asarray(idx), axis=axis)
        return x


# ---------------------------------------------------------------- helpers
def _atoms(s: Any, var: Any, scope: tuple) -> list[frozenset]:
    if _is_lit(var):
        return []
    return [s.R.axis_atoms(n) for n in s.t.axes(var, scope)]


def _atom_set(s: Any, var: Any, scope: tuple) -> frozenset:
    return frozenset().union(*_atoms(s, var, scope))


def _subsets(atoms: Sequence[int]):
    atoms = sorted(atoms)
    for r in range(1, len(atoms) + 1):
        for c in itertools.combinations(atoms, r):
            yield frozenset(c)


def _shape(s: Any, var: Any, scope: tuple, modes: dict) -> tuple:
    return tuple(len(s.R.region(n, modes)) for n in s.t.axes(var, scope))


def _coerce(s: Any, x: Any, var: Any, scope: tuple, frm: dict, to: dict) -> Any:
    """A block's array in modes ``frm`` re-laid out in modes ``to`` (u -> e)."""
    if frm == to:
        return x
    for axis, node in enumerate(s.t.axes(var, scope)):
        pos = s.R.positions(node, frm, to)
        if len(pos) != x.shape[axis] or not np.array_equal(pos, np.arange(len(pos))):
            x = jnp.take(x, jnp.asarray(pos), axis=axis) if not isinstance(x, np.ndarray) \
                else np.take(x, pos, axis=axis)
    return x


def _block(s: Any, val: Val, var: Any, scope: tuple, modes: dict) -> Any:
    """``val`` on the region ``modes`` (restricted to ``var``'s atoms): the main
    array, a block array laid out in ``modes``, ``_ZERO`` or ``UNKNOWN``."""
    if _is_lit(var):
        return val.main
    mine = {a: m for a, m in modes.items() if a in _atom_set(s, var, scope)}
    if not mine:
        return val.main
    b = val.blocks.get(frozenset(mine))
    if b is None:
        return _ZERO
    if b.value is UNKNOWN:
        return UNKNOWN
    return _coerce(s, b.value, var, scope, dict(b.modes), mine)


def _modes_for(S: frozenset, vals: Sequence[Val]) -> dict:
    modes = {a: "u" for a in S}
    for v in vals:
        for k, b in v.blocks.items():
            if k <= S:
                for a, m in b.modes:
                    if m == "e":
                        modes[a] = "e"
    return modes


def _restrict(modes: dict, atoms: frozenset) -> tuple:
    return tuple(sorted((a, m) for a, m in modes.items() if a in atoms))


def _zeros(s: Any, var: Any, scope: tuple, modes: dict) -> Any:
    return jnp.zeros(_shape(s, var, scope, modes), var.aval.dtype)


def _is_zero_literal(var: Any) -> bool:
    return _is_lit(var) and np.all(np.asarray(var.val) == 0)


def _listify(eqn: Any, outs: Any) -> list:
    return list(outs) if eqn.primitive.multiple_results or isinstance(outs, (list, tuple)) \
        else [outs]


def _bind_rule(s: Any, eqn: Any):
    return s.rule(eqn.primitive.name)


# ---------------------------------------------------------------- generic per-index rule
#: Ops that act on every index of a coupled axis independently and map zeros to zeros.
ZERO_PRESERVING = frozenset("""
reshape transpose broadcast_in_dim squeeze expand_dims slice dynamic_slice gather concatenate
split rev copy copy_p convert_element_type reduce_precision stop_gradient sharding_constraint
mesh_cast optimization_barrier cumsum cumprod cummax cummin sort reduce_window_sum
reduce_window_max reduce_window_min dynamic_update_slice stack unstack tile psum pmean pmax
pmin all_gather ppermute all_to_all pbroadcast psum_scatter reduce_scatter neg
real imag conj select_and_gather_add bitcast_convert_type
""".split())
#: Ops that act on every index of a coupled axis independently.
PER_INDEX = ZERO_PRESERVING | frozenset("pad cumlogsumexp".split())


def _generic(s: Any, eqn: Any, invals: list, scope: tuple, sub: tuple) -> list:
    from jaxprune.structured.rules import ELEMENTWISE
    name = eqn.primitive.name
    outs = _listify(eqn, _bind_rule(s, eqn)(s, eqn, [v.main for v in invals], scope, sub))
    in_sets = [_atom_set(s, v, scope) for v in eqn.invars]
    out_sets = [_atom_set(s, v, scope) for v in eqn.outvars]
    all_in, all_out = frozenset().union(*in_sets), frozenset().union(*out_sets)
    if not all_in and not all_out:
        return [Val(o) for o in outs]
    elementwise = name in ELEMENTWISE
    if not elementwise and name not in PER_INDEX:
        raise _error(eqn, "touches a pruned axis and jaxprune does not know how it combines "
                          "the removed channels")
    if (all_in - all_out) and name != "slice":  # a slice may leave out whole removed parts
        raise _error(eqn, "drops a pruned axis")
    has_blocks = any(v.blocks for v in invals)
    if not has_blocks and not (all_out - all_in) and name in ZERO_PRESERVING:
        return [Val(o) for o in outs]
    if name == "pad" and not has_blocks and _is_zero_literal(eqn.invars[1]):
        return [Val(o) for o in outs]
    results: list[dict] = [{} for _ in outs]
    for S in _subsets(all_out):
        targets = [j for j, oa in enumerate(out_sets) if S <= oa]
        if not targets:
            continue
        if name in ("concatenate", "split") and _along_parts(s, eqn, scope, S):
            _parts_block(s, eqn, invals, scope, S, results)
            continue
        modes = _modes_for(S, invals)
        got = [_block(s, v, var, scope, modes) for v, var in zip(invals, eqn.invars)]
        blocked = [i for i, (var, a) in enumerate(zip(eqn.invars, in_sets)) if S & a]
        zero = [g is _ZERO or (i not in blocked and _is_zero_literal(eqn.invars[i]))
                for i, g in enumerate(got)]
        if _annihilated(name, zero, got):
            continue
        considered = blocked or list(range(len(got)))  # a broadcast reads only the main
        if considered and all(zero[i] for i in considered):
            if name in ZERO_PRESERVING:
                continue
            if elementwise:
                c = _const_of_zeros(eqn, got)
                if c is not None:
                    if np.all(c == 0):
                        continue
                    for j in targets:
                        o = eqn.outvars[j]
                        val = jnp.broadcast_to(jnp.asarray(c, o.aval.dtype), _shape(s, o, scope, modes))
                        results[j][S] = Block(_restrict(modes, out_sets[j]), val)
                    continue
        if any(g is UNKNOWN for g in got):
            for j in targets:
                results[j][S] = Block(_restrict(modes, out_sets[j]), UNKNOWN)
            continue
        got = [_zeros(s, var, scope, modes) if g is _ZERO else g
               for g, var in zip(got, eqn.invars)]
        res = _listify(eqn, _bind_rule(s, eqn)(_View(s, modes), eqn, got, scope, sub))
        for j in targets:
            if all(res[j].shape):
                results[j][S] = Block(_restrict(modes, out_sets[j]), res[j])
    return [Val(o, r) for o, r in zip(outs, results)]


def _annihilated(name: str, zero: list, got: list) -> bool:
    if name == "mul" or name == "and":
        return any(zero)
    if name == "select_n":
        return all(zero[1:])
    return False


_CONST_CACHE: dict = {}


def _const_of_zeros(eqn: Any, got: list) -> Any:
    """f(0, ..., literals): the value an element-wise op gives where every
    non-scalar operand is zero (None if a scalar operand is not a constant)."""
    args = []
    for var, g in zip(eqn.invars, got):
        if g is _ZERO:
            args.append(np.zeros((), var.aval.dtype))
        elif _is_lit(var):
            args.append(np.asarray(var.val, var.aval.dtype))
        else:
            return None
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
    modes = _modes_for(S, invals)
    if eqn.primitive.name == "concatenate":
        for v, var in zip(invals, eqn.invars):
            if S <= _atom_set(s, var, scope):
                b = v.blocks.get(S)
                if b is not None:
                    results[0][S] = Block(_restrict(modes, _atom_set(s, eqn.outvars[0], scope)),
                                          _coerce(s, b.value, var, scope, dict(b.modes), modes)
                                          if b.value is not UNKNOWN else UNKNOWN)
        return
    b = invals[0].blocks.get(S)
    if b is None:
        return
    for j, var in enumerate(eqn.outvars):
        if S <= _atom_set(s, var, scope):
            results[j][S] = Block(_restrict(modes, _atom_set(s, var, scope)),
                                  _coerce(s, b.value, eqn.invars[0], scope, dict(b.modes), modes)
                                  if b.value is not UNKNOWN else UNKNOWN)


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
    main = _listify(eqn, _bind_rule(s, eqn)(s, eqn, [x.main], scope, sub))[0]
    per_axis = _atoms(s, xv, scope)
    axes = {a % max(len(per_axis), 1) for a in eqn.params["axes"]}
    red = frozenset().union(*[per_axis[k] for k in axes]) if per_axis else frozenset()
    rest = frozenset().union(*[a for k, a in enumerate(per_axis) if k not in axes]) \
        if per_axis else frozenset()
    if not red and not x.blocks:
        return [Val(main)]
    if red & rest:
        raise _error(eqn, "reduces an axis whose channels also index another of its axes")
    if red and name not in _COMBINE:
        raise _error(eqn, "reduces over a pruned axis (its result over the full width is "
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
        acc[S] = (m, combine(_coerce(s, v0, out_var, scope, m0, m),
                             _coerce(s, value, out_var, scope, modes, m)))

    for K, b in x.blocks.items():
        S, T = K & rest, K & red
        modes = dict(b.modes)
        if b.value is UNKNOWN:
            if T:
                raise _error(eqn, "would sum removed channels whose values are not carried "
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
            if any((S | T) not in x.blocks for T in _subsets(red)):
                if S in acc or not S:
                    modes = acc[S][0] if S in acc else {}
                    add(S, modes, jnp.zeros(_shape(s, out_var, scope, modes), out_var.aval.dtype))
    main_part = acc.pop(frozenset(), None)
    if main_part is not None:
        main = combine(main, main_part[1])
    out_atoms = _atom_set(s, out_var, scope)
    return [Val(main, {S: Block(_restrict(m, out_atoms), v) for S, (m, v) in acc.items()})]


# ---------------------------------------------------------------- contractions
def _bilinear(s: Any, eqn: Any, invals: list, scope: tuple, sub: tuple,
              lhs_batch: list, rhs_batch: list, lhs_con: list, rhs_con: list,
              grouped: bool) -> list:
    """``dot_general`` / ``conv_general_dilated``: every pair of regions that
    agree on the batch and contracted atoms adds its product, counted
    ``|R|`` times per uniform contracted atom."""
    L, R = invals[:2]
    lv, rv = eqn.invars[:2]
    main = _listify(eqn, _bind_rule(s, eqn)(s, eqn, [L.main, R.main] + [v.main for v in invals[2:]],
                                            scope, sub))[0]
    if not L.blocks and not R.blocks:
        return [Val(main)]
    la, ra = _atoms(s, lv, scope), _atoms(s, rv, scope)
    C = frozenset().union(*[la[k] for k in lhs_con], *[ra[k] for k in rhs_con])
    B = frozenset().union(*[la[k] for k in lhs_batch], *[ra[k] for k in rhs_batch])
    BC = B | C
    out_var = eqn.outvars[0]
    out_atoms = _atom_set(s, out_var, scope)
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
                raise _error(eqn, "is a grouped convolution over channels whose removed part "
                                  "is not zero")
            vals = [b.value if b is not None else None for b in (bl, br)]
            if UNKNOWN in vals:
                if T:
                    raise _error(eqn, "would contract removed channels whose values are not "
                                      "carried (random bits drawn only for kept channels, ...)")
                acc[S] = ({a: "u" for a in S}, UNKNOWN)
                continue
            modes = {a: "u" for a in kl | kr}
            for b in (bl, br):
                for a, m in (b.modes if b is not None else ()):
                    if m == "e":
                        modes[a] = "e"
            x = _coerce(s, bl.value, lv, scope, dict(bl.modes), modes) if bl else L.main
            y = _coerce(s, br.value, rv, scope, dict(br.modes), modes) if br else R.main
            term = eqn.primitive.bind(x, y, **eqn.params)
            if T:
                term = term * jnp.asarray(_weight(s, T, modes), term.dtype)
            mS = {a: modes[a] for a in S}
            if S in acc:
                m0, v0 = acc[S]
                if v0 is UNKNOWN:
                    continue
                m = {a: ("e" if "e" in (m0[a], mS[a]) else "u") for a in S}
                acc[S] = (m, _coerce(s, v0, out_var, scope, m0, m)
                          + _coerce(s, term, out_var, scope, mS, m))
            else:
                acc[S] = (mS, term)
    extra = acc.pop(frozenset(), None)
    if extra is not None:
        main = main + extra[1]
    return [Val(main, {S: Block(_restrict(m, out_atoms), v) for S, (m, v) in acc.items()})]


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
        la, ra = _atoms(s, eqn.invars[0], scope), _atoms(s, eqn.invars[1], scope)
        C = la[dn.lhs_spec[1]] | ra[dn.rhs_spec[1]]
        if not any((kl & C) == (kr & C) and (kl or kr)
                   for kl in [frozenset()] + list(L.blocks) for kr in [frozenset()] + list(R.blocks)):
            grouped = False
            return [Val(_listify(eqn, _bind_rule(s, eqn)(
                s, eqn, [v.main for v in invals], scope, sub))[0])]
    return _bilinear(s, eqn, invals, scope, sub, [], [], [dn.lhs_spec[1]], [dn.rhs_spec[1]], grouped)


# ---------------------------------------------------------------- values born in the program
def split_full(s: Any, x: Any, var: Any, scope: tuple, concrete: bool) -> Val:
    """A full-width value (a constant, an iota, an input feature) as kept array
    plus explicit blocks (made uniform, or dropped when zero, if ``concrete``)."""
    axes = s.t.axes(var, scope)
    atoms = _atom_set(s, var, scope)
    if not atoms:
        return Val(s.cut(x, var, scope))
    xp = np if concrete else jnp
    x = np.asarray(x) if concrete else x
    main = s.cut(jnp.asarray(x) if concrete else x, var, scope)
    blocks = {}
    for S in _subsets(atoms):
        modes = {a: "e" for a in S}
        b = x
        for k, n in enumerate(axes):
            idx = s.R.region(n, modes)
            if len(idx) != b.shape[k]:
                b = xp.take(b, idx, axis=k)
        if not all(b.shape):
            continue
        if concrete:
            if not b.any():
                continue
            b, modes = _compress(s, b, var, scope, modes)
            b = jnp.asarray(b)
        blocks[S] = Block(tuple(sorted(modes.items())), b)
    return Val(main, blocks)


def _compress(s: Any, b: np.ndarray, var: Any, scope: tuple, modes: dict) -> tuple:
    """Makes an explicit block uniform along every atom where it is."""
    for a in sorted(modes):
        trial = {**modes, a: "u"}
        u = b
        for k, n in enumerate(s.t.axes(var, scope)):
            src, dst = s.R.region(n, modes), s.R.region(n, trial)
            if len(src) != len(dst):
                u = np.take(u, np.searchsorted(src, dst), axis=k)
        if np.array_equal(np.asarray(_coerce(s, u, var, scope, trial, modes)), b):
            b, modes = u, trial
    return b, modes


def _iota(s, eqn, invals, scope, sub):
    full = eqn.primitive.bind(**eqn.params)
    return [split_full(s, full, eqn.outvars[0], scope, concrete=False)]


def _random_bits(s, eqn, invals, scope, sub):
    main = _listify(eqn, _bind_rule(s, eqn)(s, eqn, [v.main for v in invals], scope, sub))[0]
    atoms = _atom_set(s, eqn.outvars[0], scope)
    return [Val(main, {S: Block(tuple((a, "u") for a in sorted(S)), UNKNOWN)
                       for S in _subsets(atoms)})]


def wrap_input(s: Any, x: Any, var: Any, scope: tuple) -> Val:
    """A model input (full width): with ``prunable_io`` its removed features are
    carried explicitly, since the masked model still reads them."""
    if not _atom_set(s, var, scope):
        return Val(s.cut(x, var, scope))
    return split_full(s, x, var, scope, concrete=False)


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
            val = jnp.zeros(_shape(s, var, scope, dict(modes)), var.aval.dtype)
        elif b.value is UNKNOWN:
            raise StructuredPruningError("internal: unknown block in a loop carry")
        else:
            val = _coerce(s, b.value, var, scope, dict(b.modes), dict(modes))
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
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "iota": _iota,
    "random_bits": _random_bits,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
})


# ---------------------------------------------------------------- evaluation
def eval_jaxpr(s: Any, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], scope: tuple) -> list:
    """Evaluates ``jaxpr`` on ``Val``s (see the module docstring)."""
    env: dict = {}

    def read(v):
        return Val(v.val) if _is_lit(v) else env[v]

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
            outs = _listify(eqn, s.rule(name)(s, eqn, invals, scope, scope + (i,)))
        else:
            outs = _generic(s, eqn, invals, scope, scope + (i,))
        for v, x in zip(eqn.outvars, outs):
            if type(v).__name__ != "DropVar":
                env[v] = x
    return [read(v) for v in jaxpr.outvars]
