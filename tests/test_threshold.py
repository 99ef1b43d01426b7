"""The radix select: order keys and exact k-smallest selection."""

import contextlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxprune import threshold


@given(hnp.arrays(np.float32, 50, elements=st.floats(allow_nan=True, allow_infinity=True, width=32)))
def test_order_keys_preserve_float_order_with_nan_lowest(x):
    keys = np.asarray(threshold.order_keys(jnp.asarray(x)))
    finite = np.where(np.isnan(x), -np.inf, x)
    for i in range(len(x)):
        for j in range(len(x)):
            if np.isnan(x[i]) and not np.isnan(x[j]):
                assert keys[i] < keys[j]
            elif not np.isnan(x[i]) and not np.isnan(x[j]):
                assert (keys[i] < keys[j]) == (finite[i] < finite[j])


# Hypothesis draws the leaf shapes from a few fixed lists (and the values,
# counts and masks freely): every list compiles its programs once, so many
# examples are cheap. The lists keep the variety: one leaf, several leaves,
# equal shapes apart (stacked out of leaf order), 1-D and 3-D.
LOWEST_SHAPES = [[(3,)], [(1, 2, 2), (3,), (2, 3), (3,)], [(2, 3), (2, 3), (2, 3)]]
_jit_lowest = jax.jit(threshold.lowest)
_jit_keys = jax.jit(threshold.order_keys)


def _arrays_of(shapes, elements):
    return st.tuples(*[hnp.arrays(np.float32, s, elements=elements) for s in shapes]).map(list)


@settings(max_examples=30)
@given(st.sampled_from(LOWEST_SHAPES).flatmap(
    lambda shapes: _arrays_of(shapes, st.sampled_from([0.0, 1.0, 2.0]))), st.data())
def test_lowest_marks_exactly_n_with_ties_in_leaf_then_index_order(leaves, data):
    total = sum(x.size for x in leaves)
    n = data.draw(st.integers(0, total))
    keys = [_jit_keys(jnp.asarray(x)) for x in leaves]
    got = np.concatenate([np.asarray(m).ravel() for m in threshold.lowest(keys, n)])
    traced = _jit_lowest(keys, jnp.int32(n))
    got_traced = np.concatenate([np.asarray(m).ravel() for m in traced])
    flat = np.concatenate([x.ravel() for x in leaves])
    expected = np.zeros(total, bool)
    expected[np.argsort(flat, kind="stable")[:n]] = True
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_traced, expected)


def test_prune_count_rounds_half_to_even_like_python():
    assert threshold.prune_count(0.5, 5) == 2 == round(2.5)
    assert threshold.prune_count(0.5, 7) == 4 == round(3.5)
    assert int(threshold.prune_count(jnp.float32(0.5), 5)) == 2


def test_chunking_splits_the_outermost_possible_axis_into_cache_sized_pieces():
    assert threshold._chunking((10, 10)) == (0, 1)
    axis, k = threshold._chunking((512, 4096))
    assert axis == 0 and 512 * 4096 // k <= threshold._CHUNK and 512 % k == 0
    axis, k = threshold._chunking((3, 3, 512, 512))  # a conv kernel: split the channels
    assert axis == 2 and 9 * 512 * 512 // k <= threshold._CHUNK


DEMOTED_SHAPES = [[(3,)], [(2, 3), (3,), (2, 3)]]


@settings(max_examples=30)
@given(st.sampled_from(DEMOTED_SHAPES).flatmap(lambda shapes: st.tuples(
    _arrays_of(shapes, st.sampled_from([0.0, 1.0, 2.0])),
    st.tuples(*[hnp.arrays(np.bool_, s) for s in shapes]).map(list))), st.data())
def test_demoted_entries_rank_like_nan(pairs, data):
    leaves, demoted = pairs
    total = sum(x.size for x in leaves)
    n = data.draw(st.integers(0, total))
    got = threshold.lowest([jnp.asarray(x) for x in leaves], n,
                           demoted=[jnp.asarray(d) for d in demoted])
    as_nan = threshold.lowest([jnp.where(d, jnp.nan, x) for x, d in zip(leaves, demoted)], n)
    for a, b in zip(got, as_nan):
        np.testing.assert_array_equal(a, b)


@contextlib.contextmanager
def _patched(**values):
    """Temporarily set module constants of ``threshold`` (layout, chunk size)."""
    old = {k: getattr(threshold, k) for k in values}
    for k, v in values.items():
        setattr(threshold, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(threshold, k, v)


def _reference(leaves, kept, n):
    """Stable order: NaN or not-kept entries first (by position), then by value."""
    flat = np.concatenate([x.ravel() for x in leaves]).astype(np.float64)
    low = np.concatenate([(np.isnan(x) | ~k).ravel() for x, k in zip(leaves, kept)])
    order = np.lexsort((np.arange(flat.size), np.where(low, 0.0, flat), ~low))
    expected = np.zeros(flat.size, bool)
    expected[order[:n]] = True
    return expected


LAYOUTS = [dict(_LAYOUT="contiguous"), dict(_LAYOUT="strided"),
           dict(_LAYOUT="contiguous", _CHUNK=4), dict(_LAYOUT="strided", _CHUNK=4)]


# Fixed shape lists (see LOWEST_SHAPES), compiled once per layout: one leaf
# chunked along its last axis; a scalar, 1-D, 3-D and two equal leaves apart,
# whose chunks (with _CHUNK=4) are exact along axis 0, larger than _CHUNK
# (no divisor fits) or along an inner axis.
LAYOUT_SHAPES = [[(3, 16)], [(6, 5), (), (2, 9, 4), (6, 5), (11,)]]
_LAYOUT_FNS = {}


def _layout_lowest(layout):
    """The selection with ``LAYOUTS[layout]``, jitted once per layout (the
    layout is read while tracing, so call it under ``_patched``)."""
    if layout not in _LAYOUT_FNS:
        _LAYOUT_FNS[layout] = jax.jit(lambda s, k, m: threshold._lowest.__wrapped__(
            s, [None] * len(s), [None] * len(s), k, m, False, jnp.abs))
    return _LAYOUT_FNS[layout]


@settings(deadline=None, max_examples=100)
@given(st.sampled_from(LAYOUT_SHAPES).flatmap(lambda shapes: st.tuples(
    _arrays_of(shapes, st.sampled_from([0.0, -1.0, 1.0, 2.0, np.nan])),
    st.tuples(*[hnp.arrays(np.bool_, s) for s in shapes]).map(list))),
    st.sampled_from(range(len(LAYOUTS))), st.data())
def test_every_layout_selects_exactly_with_ties_nan_and_kept_masks(pairs, layout, data):
    # Single-device tuning (contiguous chunks, histogram lanes, spare bins)
    # and the multi-device layout must pick the same entries: the suite runs
    # on 8 simulated devices, so both are forced here.
    leaves, kept = pairs
    total = sum(x.size for x in leaves)
    n = data.draw(st.integers(0, total))
    with _patched(**LAYOUTS[layout]):
        got = _layout_lowest(layout)([jnp.asarray(x) for x in leaves],
                                     [jnp.asarray(k) for k in kept], jnp.uint32(n))
    got = np.concatenate([np.asarray(m).ravel() for m in got])
    np.testing.assert_array_equal(got, _reference([np.abs(x) for x in leaves], kept, n))


@pytest.mark.parametrize("layout", [dict(_LAYOUT="contiguous"), dict(_LAYOUT="strided")])
def test_a_tie_split_deep_inside_a_long_row_lands_on_the_exact_entry(layout):
    # 2**17 entries in one row: split into rows shorter than 2**16 for the
    # 16-bit tie counts; the cut falls among thousands of equal keys.
    x = np.zeros(1 << 17, np.float32)
    x[::3] = 1.0
    ones = int((x == 1.0).sum())
    n = (x.size - ones) + ones // 2 + 7  # every 0, then half the tied 1s and 7 more
    with _patched(**layout):
        fresh = jax.jit(lambda s, m: threshold._lowest.__wrapped__(
            s, [None], [None], [None], m, False, None))
        got = np.asarray(fresh([jnp.asarray(x)], jnp.uint32(n))[0])
    np.testing.assert_array_equal(got, _reference([x], [np.ones(x.shape, bool)], n))


def test_elementwise_and_kept_match_materialised_scores_and_demoted():
    x = jax.random.normal(jax.random.key(0), (64, 48))
    kept = jax.random.bernoulli(jax.random.key(1), 0.7, x.shape)
    fused = threshold.lowest([x], 2000, kept=[kept], elementwise=jnp.abs)[0]
    plain = threshold.lowest([jnp.abs(x)], 2000, demoted=[~kept])[0]
    np.testing.assert_array_equal(fused, plain)
    assert int(fused.sum()) == 2000


def test_mask_arguments_of_the_wrong_shape_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"kept\[0\] has shape \(3,\)"):
        threshold.lowest([jnp.ones((2, 3))], 1, kept=[jnp.ones(3, bool)])
    with pytest.raises(ValueError, match="protected has 2 entries for 1"):
        threshold.lowest([jnp.ones(3)], 1, protected=[None, None])


_digit_at = jax.jit(threshold._digit_at)


@settings(deadline=None, max_examples=60)
@given(st.data())
def test_digit_at_finds_the_bin_of_a_rank_like_a_numpy_prefix_sum(data):
    # Sparse and clustered histograms (empty blocks of 16, 256 and 4096 bins,
    # counts in the first and last bins) stress the top-down block search.
    n_filled = data.draw(st.integers(1, 40))
    bins = data.draw(st.lists(st.one_of(st.integers(0, 65535), st.sampled_from(
        [0, 15, 16, 255, 256, 4095, 4096, 65519, 65535])), min_size=n_filled,
        max_size=n_filled))
    hist = np.zeros(65536, np.uint32)
    for b in bins:
        hist[b] += data.draw(st.integers(1, 3))
    cum = np.cumsum(hist, dtype=np.uint64)
    rank = data.draw(st.integers(0, int(cum[-1]) - 1))
    want = int(np.searchsorted(cum, rank, side="right"))  # first bin whose prefix passes rank
    got, before = _digit_at(jnp.asarray(hist), jnp.uint32(rank))
    assert int(got) == want
    assert int(before) == (int(cum[want - 1]) if want else 0)
    assert hist[want] > 0
