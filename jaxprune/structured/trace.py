"""Coupled axes of a JAX function, found by walking its jaxpr.

A node is one axis of one jaxpr variable. Each primitive rule (see
``rules.py``) unites the nodes that carry the same channel index (the idea of
DepGraph, Fang et al. 2023, "DepGraph: Towards Any Structural Pruning", CVPR,
applied to jaxpr equations instead of autograd hooks).

Axes that are split or merged (``reshape`` of heads x head_dim, ``concatenate``
of branches, ``slice``/``split``) are not atoms: a class may carry a *structure*
``("prod", children)`` (row-major product), ``("sum", children)`` (direct
concatenation) or ``("take", (child,), indices)`` (the child's entries at constant
positions: ``h[:, perm]``, ``jnp.flip``). Only the atoms (classes without
structure) become groups, so pruning a head removes its ``head_dim`` block in
every merged axis, pruning a concatenated branch's channel moves every offset and
pruning a permuted channel removes it wherever the permutation put it. Two
different structures on one class are not reconciled: the class is frozen (never
guessed).

A primitive without a rule goes to the tracer's ``fallback`` (the equivariance
check of ``equivariance.py``); axes it cannot couple are recorded with the
equation, and the analysis refuses, naming both, if such an axis would be pruned.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

__all__ = ["UnionFind", "Tracer", "StructuredPruningError"]


class StructuredPruningError(ValueError):
    """Raised when a model cannot be analysed or shrunk safely."""


class UnionFind:
    """Union-find over axis nodes, with sizes, frozen flags and structures."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}
        self.struct: dict[int, tuple] = {}  # (kind, children[, indices])
        self.dropped: list[int] = []  # positions a slice leaves out
        self._has_take = False

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def freeze(self, a: int, reason: str) -> None:
        r = self.find(a)
        self.frozen.setdefault(r, reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise StructuredPruningError(
                f"internal: uniting axes of sizes {self.size[ra]} and {self.size[rb]}")
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        sb = self.struct.pop(rb, None)
        if sb is not None:
            self._add_struct(ra, sb)
        if self._has_take:
            self._break_cycle(self.find(ra))

    def set_struct(self, a: int, kind: str, children: Sequence[int],
                   indices: Optional[Sequence[int]] = None) -> None:
        """Declares ``a`` = prod/sum of ``children`` (size-1 / size-0 parts
        dropped), or ``a`` = ``children[0]`` taken at ``indices`` (``kind="take"``)."""
        if kind == "take":
            (child,) = children
            idx = tuple(int(i) for i in indices)
            if idx == tuple(range(self.size[self.find(child)])):
                self.union(a, child)
                return
            self._has_take = True
            self._add_struct(self.find(a), ("take", (child,), idx))
            self._break_cycle(self.find(a))
            return
        drop = 1 if kind == "prod" else 0
        kids = tuple(c for c in children if self.size[self.find(c)] != drop)
        if not kids:
            return
        if len(kids) == 1:
            self.union(a, kids[0])
            return
        self._add_struct(self.find(a), (kind, kids))

    def _add_struct(self, root: int, st: tuple) -> None:
        old = self.struct.get(root)
        if old is None:
            self.struct[root] = st
            return
        same = old[0] == st[0] and len(old[1]) == len(st[1]) and old[2:] == st[2:] and all(
            self.size[self.find(x)] == self.size[self.find(y)] for x, y in zip(old[1], st[1]))
        if same:
            for x, y in zip(old[1], st[1]):
                self.union(x, y)
            return
        # Two incompatible splittings of one axis: refuse to prune any part.
        self.freeze(root, "axis is split in two incompatible ways")
        for c in st[1]:
            self.freeze(c, "axis is split in two incompatible ways")

    def _break_cycle(self, root: int) -> None:
        """An axis taken from itself (``h[:, perm] + h``) would need a kept set
        closed under the permutation: freeze everything below it instead."""
        seen: set[int] = set()
        stack, cyclic = [root], False
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                cyclic = cyclic or r == root
                continue
            seen.add(r)
            st = self.struct.get(r)
            if st is not None:
                for c in st[1]:
                    if self.find(c) == root:
                        cyclic = True
                    stack.append(c)
        if cyclic:
            # Every cycle passes through ``root`` (it was closed by the union that
            # made it): dropping its structure breaks them; freezing everything
            # below keeps the other parents of those parts consistent.
            for r in seen:
                self.frozen.setdefault(r, "axis is permuted onto itself")
            self.struct.pop(root, None)

    # -- after tracing -------------------------------------------------
    def atoms(self, a: int) -> list[int]:
        """Atom roots below ``a`` (in layout order, duplicates kept)."""
        r = self.find(a)
        st = self.struct.get(r)
        if st is None:
            return [r]
        return [x for c in st[1] for x in self.atoms(c)]

    def frozen_atoms(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for r, reason in list(self.frozen.items()):
            for atom in self.atoms(r):
                out.setdefault(atom, reason)
        return out

    def kept(self, a: int, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices of axis ``a`` that survive when atom ``t`` keeps ``keep[t]``."""
        r = self.find(a)
        st = self.struct.get(r)
        if st is None:
            return np.asarray(keep.get(r, np.arange(self.size[r])), dtype=np.int64)
        kind, kids = st[0], st[1]
        if kind == "take":
            return np.flatnonzero(np.isin(np.asarray(st[2]), self.kept(kids[0], keep)))
        if kind == "sum":
            parts, offset = [], 0
            for c in kids:
                parts.append(self.kept(c, keep) + offset)
                offset += self.size[self.find(c)]
            return np.concatenate(parts)
        idx = np.zeros((1,), np.int64)
        for c in kids:
            sub = self.kept(c, keep)
            idx = (idx[:, None] * self.size[self.find(c)] + sub[None, :]).reshape(-1)
        return idx

    def labels(self, a: int, atom: int) -> Optional[np.ndarray]:
        """For each index of axis ``a``: the channel of ``atom`` it belongs to (-1: none)."""
        r = self.find(a)
        if r == atom:
            return np.arange(self.size[r])
        st = self.struct.get(r)
        if st is None:
            return None
        kind, kids = st[0], st[1]
        subs = [self.labels(c, atom) for c in kids]
        if all(s is None for s in subs):
            return None
        if kind == "take":
            return subs[0][np.asarray(st[2], np.int64)]
        sizes = [self.size[self.find(c)] for c in kids]
        if kind == "sum":
            return np.concatenate([s if s is not None else np.full(n, -1)
                                   for s, n in zip(subs, sizes)])
        out = np.full(sizes, -1, np.int64)
        for i, s in enumerate(subs):
            if s is not None:
                shape = [1] * len(sizes)
                shape[i] = sizes[i]
                cand = np.broadcast_to(s.reshape(shape), sizes)
                out = np.where(out < 0, cand, out)
        return out.reshape(-1)


Rule = Callable[["Tracer", Any, tuple, tuple], None]
# A fallback couples an equation that has no rule; it calls ``Tracer.refuse`` on
# the axes it cannot couple.
Fallback = Callable[["Tracer", Any, tuple], None]

# Values derived from constants are computed (for constant gather indices) only
# up to this many elements per array.
MAX_CONSTANT_SIZE = 1 << 20


class Tracer:
    """Walks a (closed) jaxpr and unites coupled axis nodes.

    Variables are keyed by ``(scope, var)``: a scope is the tuple of equation
    indices leading into a sub-jaxpr, so a cached sub-jaxpr (``jit`` of
    ``relu``) called twice does not couple its two call sites.
    """

    def __init__(self, rules: dict[str, Rule], fallback: Optional[Fallback] = None) -> None:
        self.uf = UnionFind()
        self.rules = rules
        self.fallback = fallback
        self.nodes: dict[tuple, list[int]] = {}
        # (primitive, equation text, nodes it could not couple, why)
        self.unknown: list[tuple[str, str, list[int], str]] = []
        self.defs: dict[tuple, tuple[Any, tuple]] = {}
        self.aliases: dict[tuple, tuple[Any, tuple]] = {}
        self.values: dict[tuple, Any] = {}

    def axes(self, var: Any, scope: tuple) -> list[int]:
        """Node ids of the axes of ``var`` (``[]`` for a literal)."""
        if type(var).__name__ == "Literal":
            return []
        key = (scope, var)
        got = self.nodes.get(key)
        if got is None:
            shape = getattr(var.aval, "shape", ())
            got = [self.uf.new(n) for n in shape]
            self.nodes[key] = got
        return got

    def shape(self, var: Any) -> tuple:
        return tuple(getattr(var.aval, "shape", ()))

    def unite_vars(self, a: Any, sa: tuple, b: Any, sb: tuple) -> None:
        xa, xb = self.axes(a, sa), self.axes(b, sb)
        if len(xa) != len(xb):
            raise StructuredPruningError("internal: rank mismatch between coupled variables")
        for p, q in zip(xa, xb):
            self.uf.union(p, q)

    def freeze_var(self, var: Any, scope: tuple, reason: str) -> None:
        for n in self.axes(var, scope):
            self.uf.freeze(n, reason)

    def refuse(self, eqn: Any, nodes: Sequence[int], why: str) -> None:
        """``eqn`` cannot follow a channel along ``nodes``: the analysis raises,
        naming it, if one of them would be pruned."""
        if nodes:
            self.unknown.append((eqn.primitive.name, _eqn_text(eqn), list(nodes), why))

    # -- values known at trace time (constants and what is computed from them)
    def alias(self, inner: Any, sub: tuple, outer: Any, scope: tuple) -> None:
        """``inner`` (of a sub-jaxpr) is bound to ``outer``."""
        if type(inner).__name__ != "Literal":
            self.aliases[(sub, inner)] = (outer, scope)

    def value(self, var: Any, scope: tuple) -> Optional[np.ndarray]:
        """The value of ``var`` if it follows from constants alone, else ``None``."""
        if type(var).__name__ == "Literal":
            return np.asarray(var.val)
        key = (scope, var)
        if key in self.values:
            return _numpy(self.values[key])
        self.values[key] = None  # also guards against cycles
        got = None
        if key in self.aliases:
            got = self.value(*self.aliases[key])
        elif key in self.defs:
            got = self._evaluate(*self.defs[key], var)
        self.values[key] = got
        return got

    def _evaluate(self, eqn: Any, scope: tuple, var: Any) -> Optional[np.ndarray]:
        if getattr(eqn, "effects", None) or any(
                int(np.prod(self.shape(v))) > MAX_CONSTANT_SIZE for v in eqn.outvars):
            return None
        ins = [self.value(v, scope) for v in eqn.invars]
        if any(x is None for x in ins):
            return None
        try:
            with jax.ensure_compile_time_eval():
                outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = list(outs) if eqn.primitive.multiple_results else [outs]
            outs = [np.asarray(x) for x in outs]
        except Exception:  # noqa: BLE001 - not computable here (PRNG keys, ...): unknown
            return None
        got = None
        for v, x in zip(eqn.outvars, outs):
            self.values[(scope, v)] = x
            if v is var:
                got = x
        return got

    def walk(self, jaxpr: Any, scope: tuple) -> None:
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.outvars:
                self.defs[(scope, v)] = (eqn, scope)
            name = eqn.primitive.name
            rule = self.rules.get(name)
            if rule is None:
                if self.fallback is not None:
                    self.fallback(self, eqn, scope)
                else:
                    self.refuse(eqn, [n for v in itertools.chain(eqn.invars, eqn.outvars)
                                      for n in self.axes(v, scope)], "it has no coupling rule")
                continue
            try:
                rule(self, eqn, scope, scope + (i,))
            except KeyError as e:  # a parameter renamed by a newer jax: say so
                if not e.args or e.args[0] in eqn.params:
                    raise
                raise parameter_error(eqn, e.args[0]) from None


def _numpy(x: Any) -> Optional[np.ndarray]:
    if x is None:
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - e.g. a PRNG key array: not a plain value
        return None


def unsupported_error(name: str, text: str, why: str = "it has no coupling rule") -> StructuredPruningError:
    return StructuredPruningError(
        f"unsupported primitive '{name}' in equation `{text}` touches an axis coupled to "
        f"the model's variables, and jaxprune.structured cannot follow a channel through it: "
        f"{why}. Register a rule in jaxprune.structured.rules.TRACE_RULES (and, if it has "
        "shape parameters, in jaxprune.structured.shrink.SHRINK_RULES), or keep this op out "
        "of the traced function.")


def parameter_error(eqn: Any, missing: Any) -> StructuredPruningError:
    """A primitive's parameters are not laid out as this jaxprune expects."""
    return StructuredPruningError(
        f"jax {jax.__version__}: primitive '{eqn.primitive.name}' has no parameter "
        f"{missing!r} (parameters: {', '.join(sorted(eqn.params))}); this jax version lays "
        "it out differently from the ones jaxprune was tested with. Please report it.")


def _eqn_text(eqn: Any) -> str:
    text = str(eqn).replace("\n", " ")
    return text if len(text) < 200 else text[:197] + "..."
