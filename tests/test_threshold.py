"""The radix select: order keys and exact k-smallest selection."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

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


@given(st.lists(st.sampled_from([(3,), (2, 3), (1, 2, 2)]).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0, 2.0]))),
    min_size=1, max_size=3), st.data())
def test_lowest_marks_exactly_n_with_ties_in_leaf_then_index_order(leaves, data):
    total = sum(x.size for x in leaves)
    n = data.draw(st.integers(0, total))
    keys = [threshold.order_keys(jnp.asarray(x)) for x in leaves]
    got = np.concatenate([np.asarray(m).ravel() for m in threshold.lowest(keys, n)])
    traced = jax.jit(threshold.lowest)(keys, jnp.int32(n))
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


@given(st.lists(st.sampled_from([(6, 5), (7, 3), (2, 9, 4), (11,)]).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0, 2.0]))),
    min_size=1, max_size=3), st.data())
def test_chunked_counting_of_large_leaves_gives_the_same_selection(leaves, data):
    # Leaves above threshold._CHUNK are counted chunk by chunk in a loop;
    # shrink the chunk so that these small leaves take that path.
    total = sum(x.size for x in leaves)
    n = data.draw(st.integers(0, total))
    old = threshold._CHUNK
    threshold._CHUNK = 4
    try:
        # A fresh jit of the private kernel so that the patched chunk applies.
        fresh = jax.jit(threshold._lowest.__wrapped__, static_argnames="wide")
        got = fresh([jnp.asarray(x) for x in leaves], [None] * len(leaves),
                    [None] * len(leaves), jnp.uint32(n), False)
    finally:
        threshold._CHUNK = old
    flat = np.concatenate([x.ravel() for x in leaves])
    expected = np.zeros(total, bool)
    expected[np.argsort(flat, kind="stable")[:n]] = True
    np.testing.assert_array_equal(np.concatenate([np.asarray(m).ravel() for m in got]), expected)


def test_chunking_splits_the_outermost_possible_axis_into_cache_sized_pieces():
    assert threshold._chunking((10, 10)) == (0, 1)
    axis, k = threshold._chunking((512, 4096))
    assert axis == 0 and 512 * 4096 // k <= threshold._CHUNK and 512 % k == 0
    axis, k = threshold._chunking((3, 3, 512, 512))  # a conv kernel: split the channels
    assert axis == 2 and 9 * 512 * 512 // k <= threshold._CHUNK


@given(st.lists(st.sampled_from([(3,), (2, 3)]).flatmap(
    lambda shape: st.tuples(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0, 2.0])),
                            hnp.arrays(np.bool_, shape))), min_size=1, max_size=3), st.data())
def test_demoted_entries_rank_like_nan(pairs, data):
    leaves, demoted = [p[0] for p in pairs], [p[1] for p in pairs]
    total = sum(x.size for x in leaves)
    n = data.draw(st.integers(0, total))
    got = threshold.lowest([jnp.asarray(x) for x in leaves], n,
                           demoted=[jnp.asarray(d) for d in demoted])
    as_nan = threshold.lowest([jnp.where(d, jnp.nan, x) for x, d in zip(leaves, demoted)], n)
    for a, b in zip(got, as_nan):
        np.testing.assert_array_equal(a, b)
