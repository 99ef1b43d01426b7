"""The layer-collapse guard (jaxprune.collapse_guard) with kept masks.

Masks nest as sparsity grows: entries already pruned (``kept`` False) rank
lowest. When the kept masks hold fewer entries of a leaf than its floor, the
guard protects entries with ``kept`` False too, and ``_top_entries`` finds
its cut among the tie at key 0. Every path (eager, jitted, and the optax
path on stacks) is checked against a NumPy reference of the guard's fixed
point: the masks and the leaves it held.
"""

import functools
import math
import warnings

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

import jaxprune
from jaxprune import collapse_guard, leaf_groups, threshold
from jaxprune import masks as M

# Sizes 16 and 12: two stacks of equal leaves once grouped.
SHAPES = [(4, 4), (3, 4), (4, 4), (2, 8), (3, 4)]


def _select(vals, n_prune, protected):
    """Prunes the ``n_prune`` lowest unprotected entries by (value, leaf
    order, flat index); returns keep-masks per leaf."""
    v, p = np.concatenate(vals), np.concatenate(protected)
    order = np.lexsort((np.arange(v.size), v, p))
    keep = np.ones(v.size, bool)
    keep[order[:n_prune]] = False
    return np.split(keep, np.cumsum([x.size for x in vals])[:-1])


def _tops(v, f):
    """A leaf's ``f`` highest entries (ties: the later flat index first)."""
    top = np.zeros(v.size, bool)
    top[np.lexsort((np.arange(v.size), v))[v.size - f:]] = True
    return top


def guard_reference(leaves, kept, s, min_density):
    """(keep-masks, held flags, over, passes): the guard's loop in NumPy.
    Entries with ``kept`` False or a NaN score rank lowest, below every
    magnitude; ``over``: the floors leave fewer entries free than asked."""
    vals = [np.where(k & ~np.isnan(x), np.abs(x), -1.0).ravel().astype(np.float64)
            for x, k in zip(leaves, kept)]
    sizes = [v.size for v in vals]
    if min_density is None:
        floors = [-(-(n - threshold.prune_count(s, n)) // collapse_guard.GUARD_SHARE)
                  for n in sizes]
    else:
        floors = [min(math.ceil(min_density * n), n) for n in sizes]
    n_prune = threshold.prune_count(s, sum(sizes))
    free = sum(sizes) - sum(floors)
    n_guarded = min(n_prune, free)
    held = np.zeros(len(vals), bool)
    passes = 0
    while True:
        passes += 1
        protected = [_tops(v, f) if h else np.zeros(v.size, bool)
                     for v, f, h in zip(vals, floors, held)]
        keep = _select(vals, n_guarded, protected)
        under = np.array([k.sum() < f for k, f in zip(keep, floors)]) & ~held
        if not under.any():
            break
        held |= under
    # The fixed point equals protecting every leaf's floor at once.
    at_once = _select(vals, n_guarded, [_tops(v, f) for v, f in zip(vals, floors)])
    for a, b in zip(keep, at_once):
        np.testing.assert_array_equal(a, b)
    return keep, held, n_prune > free, passes


def _unstructured(params, kept, s, min_density):
    return M._unstructured(params, s, "global", None, "uniform", None, min_density, kept=kept,
                           elementwise=jnp.abs)


_jitted = {md: jax.jit(lambda p, k, s, md=md: _unstructured(p, k, s, md)) for md in (None, 0.25)}


@functools.partial(jax.jit, static_argnums=0)
def _guarded_stacked_jit(groups, parts, pk, s):
    return collapse_guard.guarded_stacked(parts, pk, [list(g) for g in groups], s, jnp.abs)


def _guarded_stacked(xs, kept, s):
    """The optax path: ``guarded_stacked`` on stacks of equal leaves."""
    groups = leaf_groups.group_indices(xs, kept)
    keep, found = _guarded_stacked_jit(tuple(map(tuple, groups)),
                                       [leaf_groups.stack(xs, g) for g in groups],
                                       [leaf_groups.stack(kept, g) for g in groups], s)
    return leaf_groups.unstack(keep, groups, len(xs), like=xs), found


values = st.sampled_from([0.0, 1.0, 2.0, 3.0, np.nan])


@settings(max_examples=15, deadline=None)
@given(st.tuples(*[hnp.arrays(np.float32, shape, elements=values) for shape in SHAPES]),
       st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=len(SHAPES),
                max_size=len(SHAPES)),
       st.integers(0, 2**16), st.floats(0.5, 0.96875, width=32),
       st.sampled_from([None, 0.25]))
def test_guard_with_kept_masks_below_the_floors_matches_the_reference(leaves, densities, seed, s,
                                                                      min_density):
    rng = np.random.default_rng(seed)
    leaves = [x * (i + 1) ** 3 for i, x in enumerate(leaves)]  # very different scales
    kept = [rng.random(x.shape) < d for x, d in zip(leaves, densities)]
    params = {f"l{i}": jnp.asarray(x) for i, x in enumerate(leaves)}
    kept_tree = {f"l{i}": jnp.asarray(k) for i, k in enumerate(kept)}
    want, held, over, _ = guard_reference(leaves, kept, s, min_density)
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxprune.PruningWarning)
        try:
            got.append(_unstructured(params, kept_tree, s, min_density))
        except ValueError as e:  # floors that exceed what s keeps are refused eagerly
            assert over and "min_density" in str(e)
        got.append(_jitted[min_density](params, kept_tree, jnp.float32(s)))
    got = [[np.asarray(m[f"l{i}"]).ravel() for i in range(len(leaves))] for m in got]
    if min_density is None:
        stacked, found = _guarded_stacked(list(params.values()), list(kept_tree.values()),
                                          jnp.float32(s))
        got.append([np.asarray(m).ravel() for m in stacked])
        np.testing.assert_array_equal(np.asarray(found["collapse"]), held)
        assert bool(found["short"]) == (over and held.any())
    for masks in got:
        for g, w in zip(masks, want):
            np.testing.assert_array_equal(g, w)


def test_guard_holds_leaves_whose_kept_masks_are_all_false():
    # Every entry already pruned: all keys tie at 0, so the global ranking
    # empties the first leaves (leaf order); holding them at their floor (one
    # entry) empties the next ones, and so on for several passes. The floors
    # use up the whole budget: every leaf keeps exactly its last entry.
    xs = [jnp.full((2, 2), 1.0) for _ in range(20)]
    kept = [jnp.zeros((2, 2), bool) for _ in xs]
    want, held, over, passes = guard_reference([np.asarray(x) for x in xs],
                                               [np.asarray(k) for k in kept], 0.75, None)
    assert passes >= 4 and not over
    params = {f"l{i:02d}": x for i, x in enumerate(xs)}
    kept_tree = {f"l{i:02d}": k for i, k in enumerate(kept)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxprune.PruningWarning)
        eager = _unstructured(params, kept_tree, 0.75, None)
        traced = _jitted[None](params, kept_tree, jnp.float32(0.75))
    stacked, found = _guarded_stacked(xs, kept, jnp.float32(0.75))
    np.testing.assert_array_equal(np.asarray(found["collapse"]), held)
    for got in ([eager[p] for p in sorted(params)], [traced[p] for p in sorted(params)], stacked):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g).ravel(), w)
            assert np.asarray(g).ravel().tolist() == [False, False, False, True]
