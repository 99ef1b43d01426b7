"""Values of the masked dense model, split by region (see ``masked.py``).

For a value whose axes carry pruned atoms, each set ``S`` of pruned atoms
names a *region*: the entries removed exactly along the atoms of ``S``. The
empty set is the kept region (the ordinary shrunk array); every other region
is a ``Block`` (absent: zero), laid out per atom as ``u`` (uniform: one
representative stands for all ``|R|`` removed channels) or ``e`` (explicit:
every removed channel). ``Regions`` maps regions to indices of every axis;
``View`` lets the ordinary shrink rules compute one block.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structured.trace import StructuredPruningError

__all__ = ["Val", "Block", "UNKNOWN", "ZERO", "Regions", "View", "split_full", "wrap_input", "take_kept",
           "varying_like"]

class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: Marks a removed block whose values are not carried (an error if it reaches a kept value).
UNKNOWN = _Unknown()
#: A block known to be zero (internal marker while evaluating).
ZERO = object()


class Block(NamedTuple):
    """One removed region of a value: ``modes`` ((atom, 'u'|'e'), ...) and its array."""

    modes: tuple
    value: Any


@jax.tree_util.register_pytree_node_class
class Val:
    """A value of the masked dense model: the kept array and the removed blocks
    (``{frozenset(atoms): Block}``; an absent key is a zero block). ``const``
    is its value when it is one constant everywhere (a literal, a broadcast
    literal), else None."""

    __slots__ = ("main", "blocks", "const")

    def __init__(self, main: Any, blocks: dict | None = None, const: Any = None) -> None:
        self.main = main
        self.blocks = blocks or {}
        self.const = const

    def tree_flatten(self):
        keys = sorted(self.blocks, key=lambda k: tuple(sorted(k)))
        arrays = [self.main] + [self.blocks[k].value for k in keys
                                if self.blocks[k].value is not UNKNOWN]
        aux = tuple((k, self.blocks[k].modes, self.blocks[k].value is UNKNOWN) for k in keys)
        return arrays, (aux, self.const)

    @classmethod
    def tree_unflatten(cls, aux, arrays):
        aux, const = aux
        it = iter(arrays)
        main = next(it)
        blocks = {k: Block(m, UNKNOWN if unk else next(it)) for k, m, unk in aux}
        return cls(main, blocks, const)

    def structure(self) -> tuple:
        return tuple(sorted((tuple(sorted(k)), b.modes, b.value is UNKNOWN)
                            for k, b in self.blocks.items()))


def is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def masked_error(eqn: Any, why: str) -> StructuredPruningError:
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
        kind, kids = st[0], st[1]
        if kind == "take":  # the child's entries at constant positions (a permutation)
            inside = np.isin(np.asarray(st[2]), self.region(kids[0], modes))
            return np.flatnonzero(inside).astype(np.int64)
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


class View:
    """The shrinker seen through one region: every axis has that region's extent,
    so the ordinary shrink rules compute a block."""

    def __init__(self, s: Any, modes: dict) -> None:
        self.s, self.t, self.a, self.modes = s, s.t, s.a, modes

    def kept(self, node: int) -> np.ndarray:
        return self.s.R.region(node, self.modes)

    def new_shape(self, var: Any, scope: tuple) -> tuple:
        return tuple(len(self.kept(n)) for n in self.t.axes(var, scope))

    def old_shape(self, var: Any) -> tuple:
        return self.s.old_shape(var)

    def cut(self, x: Any, var: Any, scope: tuple) -> Any:
        return take_kept(x, self.t.axes(var, scope), self.kept)


# ---------------------------------------------------------------- helpers
def take_kept(x: Any, nodes: Sequence[int], kept: Any) -> Any:
    """``x`` (a full-size value whose axes are ``nodes``) cut to ``kept(node)``
    indices along every axis that loses some."""
    for axis, node in enumerate(nodes):
        idx = kept(node)
        if len(idx) != x.shape[axis]:
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


def atoms_of(s: Any, var: Any, scope: tuple) -> list[frozenset]:
    if is_lit(var):
        return []
    return [s.R.axis_atoms(n) for n in s.t.axes(var, scope)]


def atom_set(s: Any, var: Any, scope: tuple) -> frozenset:
    return frozenset().union(*atoms_of(s, var, scope))


def subsets(atoms: Sequence[int]):
    atoms = sorted(atoms)
    for r in range(1, len(atoms) + 1):
        for c in itertools.combinations(atoms, r):
            yield frozenset(c)


def block_shape(s: Any, var: Any, scope: tuple, modes: dict) -> tuple:
    return tuple(len(s.R.region(n, modes)) for n in s.t.axes(var, scope))


def coerce(s: Any, x: Any, var: Any, scope: tuple, frm: dict, to: dict) -> Any:
    """A block's array in modes ``frm`` re-laid out in modes ``to`` (u -> e)."""
    if frm == to:
        return x
    for axis, node in enumerate(s.t.axes(var, scope)):
        pos = s.R.positions(node, frm, to)
        if len(pos) != x.shape[axis] or not np.array_equal(pos, np.arange(len(pos))):
            x = jnp.take(x, jnp.asarray(pos), axis=axis) if not isinstance(x, np.ndarray) \
                else np.take(x, pos, axis=axis)
    return x


def block_of(s: Any, val: Val, var: Any, scope: tuple, modes: dict) -> Any:
    """``val`` on the region ``modes`` (restricted to ``var``'s atoms): the main
    array, a block array laid out in ``modes``, ``ZERO`` or ``UNKNOWN``."""
    if is_lit(var):
        return val.main
    mine = {a: m for a, m in modes.items() if a in atom_set(s, var, scope)}
    if not mine:
        return val.main
    b = val.blocks.get(frozenset(mine))
    if b is None:
        return ZERO
    if b.value is UNKNOWN:
        return UNKNOWN
    return coerce(s, b.value, var, scope, dict(b.modes), mine)


def modes_for(S: frozenset, vals: Sequence[Val]) -> dict:
    modes = {a: "u" for a in S}
    for v in vals:
        for k, b in v.blocks.items():
            if k <= S:
                for a, m in b.modes:
                    if m == "e":
                        modes[a] = "e"
    return modes


def restrict(modes: dict, atoms: frozenset) -> tuple:
    return tuple(sorted((a, m) for a, m in modes.items() if a in atoms))


def zeros_block(s: Any, var: Any, scope: tuple, modes: dict) -> Any:
    return varying_like(jnp.zeros(block_shape(s, var, scope, modes), var.aval.dtype), var)


def varying_like(x: Any, var: Any) -> Any:
    """``x`` (a constant made here) varying over the same manual mesh axes as
    ``var`` inside a ``shard_map`` body, so that ops may mix them."""
    want = _varying(var.aval)
    missing = want - _varying(jax.typeof(x))
    if missing and hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, tuple(sorted(missing)), to="varying")
    return x


def _varying(aval: Any) -> frozenset:
    return frozenset(getattr(getattr(aval, "manual_axis_type", None), "varying", None) or ())


def is_zero_literal(var: Any) -> bool:
    return is_lit(var) and np.all(np.asarray(var.val) == 0)


def listify(eqn: Any, outs: Any) -> list:
    return list(outs) if eqn.primitive.multiple_results or isinstance(outs, (list, tuple)) \
        else [outs]


def bind_rule(s: Any, eqn: Any):
    return s.rule(eqn.primitive.name)



# ---------------------------------------------------------------- values born in the program
def split_full(s: Any, x: Any, var: Any, scope: tuple, concrete: bool) -> Val:
    """A full-width value (a constant, an iota, an input feature) as kept array
    plus explicit blocks (made uniform, or dropped when zero, if ``concrete``)."""
    axes = s.t.axes(var, scope)
    atoms = atom_set(s, var, scope)
    if not atoms:
        return Val(s.cut(x, var, scope))
    xp = np if concrete else jnp
    x = np.asarray(x) if concrete else x
    main = s.cut(jnp.asarray(x) if concrete else x, var, scope)
    blocks = {}
    for S in subsets(atoms):
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
        if np.array_equal(np.asarray(coerce(s, u, var, scope, trial, modes)), b):
            b, modes = u, trial
    return b, modes


def wrap_input(s: Any, x: Any, var: Any, scope: tuple) -> Val:
    """A model input (full width): with ``prunable_io`` its removed features are
    carried explicitly, since the masked model still reads them."""
    if not atom_set(s, var, scope):
        return Val(s.cut(x, var, scope))
    return split_full(s, x, var, scope, concrete=False)


