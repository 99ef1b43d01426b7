"""The layer-collapse guard of global-scope pruning.

One global threshold over magnitudes can empty a whole layer whose weights
are small at initialisation, which disconnects the network (Tanaka et al.
2020, SynFlow, call this "layer collapse"; Lee et al. 2021, LAMP, show
global magnitude pruning doing it). Under ``scope="global"`` every leaf
therefore keeps at least a *floor* of entries: ``ceil(min_density * n)``
when ``min_density`` is given, else (the default guard) a tenth, rounded
up, of what uniform pruning would keep, ``ceil((n - prune_count(s, n)) /
10)`` (1% density at 90% sparsity). ``min_density=0.0`` turns it off.

What it computes: the global selection of ``prune_count(s, N)`` entries
with every leaf held at its floor. A leaf below its floor keeps its
own ``floor`` highest-ranked entries, and the other leaves give up the
difference, so the total count is unchanged (where the floors leave
fewer entries free than asked, that is refused up front when the counts
are static; under ``jit`` every free entry is pruned and the guard says
so). The plain selection is made first and is the answer whenever no
leaf is below its floor, so ordinary global allocations are left alone;
otherwise the leaves below are protected and the selection redone until
none is (a fixed point that equals protecting every floor at once). Eagerly
that is a Python loop; under ``jit`` one ``lax.while_loop`` over stacks of
equal leaves (``jaxprune.leaf_groups``) whose body holds the only copy of
the selection. The default guard reports the leaves it held (a
``PruningWarning``, or the "collapse" and "short" flags of a collecting
``diagnostics.Reporter``); an explicit ``min_density`` reports nothing.

``jaxprune.masks`` calls ``_guarded`` (leaves) and ``_global_rows``
(stacked layers under ``jit``); ``jaxprune.transform`` calls
``guarded_stacked`` on the stacks it already holds.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import diagnostics, leaf_groups, threshold

__all__: list[str] = []

# The default guard of scope="global" keeps in every leaf at least this
# fraction of what uniform (local) pruning would keep.
GUARD_SHARE = 10


def _floors(xs: Sequence[jax.Array], sparsity, min_density: Optional[float]):
    """Minimum kept entries per leaf: ``ceil(min_density * n)``, or by
    default a tenth (rounded up) of the leaf's uniform share
    ``n - prune_count(sparsity, n)``. A list of Python ints, or with a
    traced sparsity one uint32 vector over the leaves (computed once, so
    the program does not grow with the leaves)."""
    return _floors_of_sizes([x.size for x in xs], sparsity, min_density)


def _floors_of_sizes(sizes: Sequence[int], sparsity, min_density: Optional[float]):
    """``_floors`` from the leaf sizes."""
    if min_density is not None:
        return [min(math.ceil(min_density * n), n) for n in sizes]
    if _static(sparsity):
        return [-(-(n - threshold.prune_count(sparsity, n)) // GUARD_SHARE) for n in sizes]
    share = (jnp.asarray(np.asarray(sizes, np.uint32))
             - threshold.prune_count_vector([sparsity] * len(sizes), sizes))
    return (share + jnp.uint32(GUARD_SHARE - 1)) // jnp.uint32(GUARD_SHARE)


@jax.jit
def _kept_counts(keep):
    return [jnp.sum(k, dtype=jnp.uint32) for k in keep]


def _guarded(paths, xs, sparsity, min_density, kept, elementwise, n_prune, total):
    """The global selection with every leaf held at its floor.

    The plain selection is made first. If it leaves no leaf below its floor
    it is the answer: protecting each leaf's top-floor entries would select
    the same entries (a leaf's kept set is a top set of the same order).
    Otherwise the leaves below are protected (their top-floor entries rank
    above everything) and the selection is redone; a leaf pushed below its
    floor by that joins them, until none is below. The result equals
    protecting every leaf's floor at once. Under ``jit`` this is one
    ``while_loop`` whose body holds the only copy of the selection (its
    first pass protects nothing), so the guard adds one count per leaf and
    an all-False protection mask to a mask update, and two small bisection
    loops per leaf to the program, not a second selection.
    """
    floors = _floors(xs, sparsity, min_density)
    n_guarded, over = _guard_budget(floors, total, n_prune, sparsity, min_density)

    def below(keep, protect):
        counts = _kept_counts(keep)
        return jnp.stack([c < f for c, f in zip(counts, floors)]) & ~protect

    def select(protect):  # eager (concrete flags): protect only the leaves below
        # (all-False masks elsewhere, not None: one compiled selection for every case)
        protected = [_top_entries(xs[i], floors[i], kept[i], elementwise)
                     if bool(protect[i]) else jnp.zeros_like(xs[i], dtype=bool)
                     for i in range(len(xs))]
        return threshold._select(xs, n_guarded, protected, None, kept, elementwise, keep=True)

    protect = jnp.zeros(len(xs), bool)
    concrete = _static(sparsity) and not any(isinstance(x, jax.core.Tracer) for x in xs) \
        and not any(isinstance(d, jax.core.Tracer) for d in kept)
    if concrete:  # eager: select, then protect only the leaves below, until none is
        keep = threshold._select(xs, n_prune, None, None, kept, elementwise, keep=True)
        under = below(keep, protect)
        while bool(under.any()):
            protect = protect | under
            keep = select(protect)
            under = below(keep, protect)
    else:
        keep, protect = _guarded_loop(xs, floors, kept, elementwise, n_guarded)
    if min_density is not None:
        return keep, []  # an explicit floor was asked for: nothing to report
    return keep, _guard_checks(paths, protect, over & jnp.any(protect))


def _guard_budget(floors, total: int, n_prune, sparsity, min_density):
    """``(n_guarded, over)``: how many entries the guarded selection prunes
    (at most what the floors leave free) and whether that is fewer than
    asked; refused up front when both are known and the floors win."""
    free = total - (sum(floors) if isinstance(floors, list) else jnp.sum(floors, dtype=jnp.uint32))
    if _static(n_prune, free):
        if n_prune > free:
            raise ValueError(
                f"sparsity={sparsity} prunes {n_prune} of {total} entries, but "
                + (f"min_density={min_density}" if min_density is not None else
                   "the default layer-collapse guard (a tenth of each leaf's uniform share)")
                + f" keeps {total - free}; lower the sparsity, or pass min_density=0.0 to let "
                "global pruning empty whole leaves")
        return n_prune, jnp.asarray(False)
    n_guarded = jnp.minimum(jnp.asarray(n_prune, jnp.uint32), jnp.asarray(free, jnp.uint32))
    return n_guarded, jnp.asarray(n_prune, jnp.uint32) > jnp.asarray(free, jnp.uint32)


def _guard_checks(names: Sequence[str], held, short) -> list:
    """The default guard's reports: the leaves it held ("collapse", one flag
    per name) and whether it pruned fewer entries than asked ("short")."""
    return [
        ("collapse", held, lambda h: None if not h.any() else
         diagnostics.collapse_message(diagnostics.leaves_flagged(names, h), False)),
        ("short", short, lambda sh: None if not sh.any() else
         "the layer-collapse guard pruned fewer entries than asked: the floors exceed what "
         "the sparsity keeps. Lower the sparsity, or pass min_density=0.0")]


def _global_rows(paths, xs, sparsity, min_density, kept, elementwise, axes, per_leaf: bool):
    """``masks._global_per_layer`` with the guard under ``jit``, without
    slicing: a stacked leaf's layers are rows of the stacks (``leaf_groups``
    rows), each row a leaf of its own for the floors, the tie order and the
    reports. Slicing every layer out and stacking the slices again cost a
    kernel per layer and a copy of the weights at every mask update. Returns
    the keep-masks and the guard's checks, flagged per leaf (any of its
    layers) when ``per_leaf``, else per layer (named ``path[j]``)."""
    rows = [a is not None for a in axes]
    moved = [x if a is None else jnp.moveaxis(x, a, 0) for x, a in zip(xs, axes)]
    kmoved = [d if d is None or a is None else jnp.moveaxis(d, a, 0) for d, a in zip(kept, axes)]
    counts = leaf_groups.row_counts(moved, rows)
    starts = np.cumsum([0] + counts[:-1]).tolist()
    vpaths, vsizes = [], []
    for p, x, r, c in zip(paths, moved, rows, counts):
        vpaths += [f"{p}[{j}]" for j in range(c)] if r else [p]
        vsizes += [int(np.prod(x.shape[1:] if r else x.shape))] * c
    total = sum(vsizes)
    n_prune = threshold.prune_count(sparsity, total)
    floors = _floors_of_sizes(vsizes, sparsity, min_density)
    n_guarded, over = _guard_budget(floors, total, n_prune, sparsity, min_density)
    groups = leaf_groups.group_indices(moved, kmoved, rows=rows)
    parts = [leaf_groups.stack(moved, g, rows) for g in groups]
    pk = [leaf_groups.stack(kmoved, g, rows) for g in groups]
    vgroups = [[v for i in g for v in range(starts[i], starts[i] + counts[i])] for g in groups]
    keep_parts, protect = _guarded_loop_parts(parts, pk, vgroups, floors, elementwise, n_guarded)
    keep = leaf_groups.unstack(keep_parts, groups, len(moved), rows, like=moved)
    keep = [k if a is None else jnp.moveaxis(k, 0, a) for k, a in zip(keep, axes)]
    if min_density is not None:
        return keep, []  # an explicit floor was asked for: nothing to report
    if per_leaf:  # flags per leaf (any of its layers)
        bounds = np.cumsum([0] + counts)
        held = jnp.stack([jnp.any(protect[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        names = paths
    else:  # warnings name the layer (path[j])
        held, names = protect, vpaths
    return keep, _guard_checks(names, held, over & jnp.any(protect))


def _guarded_loop(xs, floors, kept, elementwise, n_guarded):
    """``_guarded``'s fixed point under ``jit``: one ``while_loop`` over
    stacks of equal leaves (``jaxprune.leaf_groups``), stacked once outside
    it, whose body holds the only copy of the selection (its first pass
    protects nothing). Kept counts and protection flags are vectors per
    stack, so the loop carries a few arrays, not one per leaf. Returns the
    keep-masks per leaf and the protection flags in leaf order."""
    groups = leaf_groups.group_indices(xs, kept)
    px = [leaf_groups.stack(xs, g) for g in groups]
    pk = [leaf_groups.stack(kept, g) for g in groups]
    keep, protect = _guarded_loop_parts(px, pk, groups, floors, elementwise, n_guarded)
    return leaf_groups.unstack(keep, groups, len(xs), like=xs), protect


def guarded_stacked(parts: Sequence[jax.Array], kept: Sequence[Optional[jax.Array]], groups,
                    sparsity, elementwise=None) -> tuple[list[jax.Array], dict]:
    """Global keep-masks with the default layer-collapse guard on stacks the
    caller already holds (``jaxprune.leaf_groups``: part ``p`` stacks leaves
    ``groups[p]``); the masks ``unstructured(..., scope="global")`` gives
    those leaves, still stacked, and the guard's findings ("collapse": one
    flag per leaf in leaf order, "short")."""
    sizes = [0] * sum(len(g) for g in groups)
    for part, g in zip(parts, groups):
        for i in g:
            sizes[i] = int(np.prod(part.shape[1:]))
    total = sum(sizes)
    n_prune = threshold.prune_count(sparsity, total)
    floors = _floors_of_sizes(sizes, sparsity, None)
    n_guarded, over = _guard_budget(floors, total, n_prune, sparsity, None)
    keep, protect = _guarded_loop_parts(parts, kept, groups, floors, elementwise, n_guarded)
    return keep, {"collapse": protect, "short": over & jnp.any(protect)}


def _guarded_loop_parts(px, pk, groups, floors, elementwise, n_guarded):
    """``_guarded_loop`` on stacks: returns the stacked keep-masks and the
    protection flags in leaf order."""
    pf = [jnp.asarray(floors, jnp.uint32)[np.asarray(g)] for g in groups]

    def tops(x, k, f, on):
        def one(args):
            row, kr, fr, o = args
            # zeros_like keeps the leaf's sharding (both cond branches must match)
            return lax.cond(o, lambda: _top_entries(row, fr, kr, elementwise),
                            lambda: jnp.zeros_like(row, dtype=bool))
        if x.shape[0] == 1:
            return one((x[0], None if k is None else k[0], f[0], on[0]))[None]
        return lax.map(one, (x, k, f, on))

    def below(keep, protect):
        return [(jnp.sum(k, axis=tuple(range(1, k.ndim)), dtype=jnp.uint32) < f) & ~p
                for k, f, p in zip(keep, pf, protect)]

    def body(carry):
        protect, _, under, _ = carry
        protect = [p | u for p, u in zip(protect, under)]
        protected = [tops(x, k, f, p) for x, k, f, p in zip(px, pk, pf, protect)]
        keep = threshold._select_parts(px, groups, n_guarded, protected, pk, elementwise,
                                       keep=True)
        return protect, keep, below(keep, protect), jnp.asarray(False)

    none = [jnp.zeros(len(g), bool) for g in groups]
    start = (none, [jnp.ones_like(x, dtype=bool) for x in px], none, jnp.asarray(True))
    protect, keep, _, _ = lax.while_loop(
        lambda c: c[3] | jnp.any(jnp.concatenate(c[2])), body, start)
    order = np.argsort(np.concatenate([np.asarray(g) for g in groups]), kind="stable")
    return keep, jnp.concatenate(protect)[order]


@functools.partial(jax.jit, static_argnums=3)  # eagerly: one program per leaf shape
def _top_entries(x: jax.Array, k, kept: Optional[jax.Array], elementwise) -> jax.Array:
    """Exactly the ``k`` highest-ranked entries of one leaf (ties: the later
    flat index first, as in the global ranking; ``kept`` False ranks lowest).

    Found by bisection: the k-th highest order key (one counting pass per
    key bit), then the tie cut among equal keys (one pass per index bit).
    Each pass is a compare and a sum, so this compiles to two small loops
    per leaf (the radix select would add a full engine per leaf) and keeps a
    sharded leaf sharded; it only runs where the layer-collapse guard acts.
    Either loop is skipped where one pass gives its answer: a leaf with
    fewer than ``k`` entries above key 0 (``kept`` masks pruned it below its
    floor: the k-th key is 0), and a cut that keeps every tie (distinct
    scores).
    """
    score = x if elementwise is None else elementwise(x)
    wide = jnp.dtype(score.dtype).itemsize > 4
    keys = threshold.order_keys(score, wide)
    if kept is not None:
        keys = jnp.where(kept, keys, keys.dtype.type(0))
    udt = keys.dtype
    k = jnp.asarray(k, udt)

    def count(mask):
        return jnp.sum(mask, dtype=udt)

    def key_step(_, bounds):  # largest t with count(keys >= t) >= k
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = count(keys >= mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    bits = udt.itemsize * 8
    zero = jnp.zeros((), udt)
    # Fewer than k entries above key 0 (kept masks pruned the leaf below its
    # floor; NaN): t is 0, found in one pass instead of ``bits``.
    t = lax.cond(count(keys > zero) < k, lambda: zero, lambda: lax.fori_loop(
        0, bits, key_step, (zero, jnp.asarray(np.iinfo(udt).max, udt)))[0])
    need = k - count(keys > t)  # ties at t to keep, from the last index down
    index = threshold._flat_index(keys).astype(udt)
    tie = keys == t

    def index_step(_, bounds):  # smallest c with count(tie & index >= c) <= need
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = count(tie & (index >= mid)) <= need
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    # All ties kept (distinct scores: one tie): the cut is 0, no bisection.
    cut = lax.cond(count(tie) <= need, lambda: jnp.zeros((), udt), lambda: lax.fori_loop(
        0, max(int(x.size), 1).bit_length() + 1, index_step,
        (jnp.zeros((), udt), jnp.asarray(x.size, udt)))[0])
    return ((keys > t) | (tie & (index >= cut))) & (k > 0)


def _static(*values) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) for v in values)
