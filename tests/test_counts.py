"""One count rule everywhere: prune_count(s, n) = round_half_even(float32(s) * n), exactly.

Eager masks, jitted masks, ``prune``, ``pruned``, sparse training, lottery
rounds and structured channel selection must all prune this many entries.
"""

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune
from jaxprune import lottery, threshold
from jaxprune import sparse_training as S
from jaxprune.structured.groups import Group
from jaxprune.structured.importance import select_channels


def reference(s, n):
    return round(fractions.Fraction(float(np.float32(s))) * int(n))


# The cases of the issue (eager and jit used to disagree) and exact half-integer products.
# float32(0.0005) = 0.000500000024: 0.50000002 entries round up to 1.
KNOWN = [(0.9, 35, 31), (0.35, 10, 3), (0.0005, 1000, 1), (0.5, 5, 2), (0.5, 7, 4),
         (0.75, 2, 2), (0.25, 6, 2), (0.375, 4, 2), (1.0, 35, 35), (0.0, 35, 0)]


@pytest.mark.parametrize("s, n, expected", KNOWN)
def test_prune_count_follows_the_float32_rule_eagerly_and_traced(s, n, expected):
    assert reference(s, n) == expected
    assert threshold.prune_count(s, n) == expected
    assert int(jax.jit(threshold.prune_count)(jnp.float32(s), jnp.uint32(n))) == expected


def test_traced_sparsity_with_a_python_n_of_2_to_the_31_or_more_counts_exactly():
    # A Python n went through int32 on its way to the uint32 product: n >= 2**31 overflowed.
    for n in (2**31, 2**32 - 1):
        s = jnp.float32(0.9)
        assert int(threshold.prune_count(s, n)) == reference(0.9, n)
        assert int(jax.jit(lambda t: threshold.prune_counts([t], [n])[0])(s)) == reference(0.9, n)


_counts = jax.jit(jax.vmap(threshold.prune_count))


def test_prune_count_is_exact_for_every_n_up_to_2_to_the_31_without_x64():
    # float32 products are not exact above 2**24 and float64 not above 2**29 (s has 24 bits):
    # the count is compared with exact rational arithmetic, nothing is allocated.
    rng = np.random.default_rng(0)
    n = np.concatenate([rng.integers(1 << 24, 1 << 31, 3000), [2**31 - 1, 2**31 - 2, 1 << 24, 1 << 30]])
    s = rng.random(n.size).astype(np.float32)
    # Exact half-integer products: s = odd / 2**(b + 1), n = 2**b * odd.
    b = rng.integers(0, 20, 600)
    s[:600] = ((2 * rng.integers(0, 2**b) + 1) / 2.0 ** (b + 1)).astype(np.float32)
    n[:600] = (2 ** b * (2 * rng.integers(1, 2**(30 - b) // 2) + 1)).astype(np.int64)
    s[600:700] = rng.choice([0.0, 1.0, 1e-45, 1e-30, 2**-24, 2**-31, 0.5, 0.9999999], 100)
    got = np.asarray(_counts(jnp.asarray(s), jnp.asarray(n.astype(np.uint32))))
    expected = np.array([reference(a, c) for a, c in zip(s, n)])
    assert (np.asarray(s[:600], np.float64) * n[:600] % 1 == 0.5).all()  # really half-integers
    np.testing.assert_array_equal(got, expected)
    for a, c in zip(s[:50], n[:50]):  # the static path (Python ints) gives the same
        assert threshold.prune_count(float(a), int(c)) == reference(a, c)


# Leaves of 35, 10 and 1000 entries (the cases): local scope counts each alone,
# global scope all 1045 together; one tree keeps the number of compilations small.
SIZES = (35, 10, 1000)
PARAMS = {f"l{n}": jnp.abs(jax.random.normal(jax.random.key(n), (n, 1))) + 0.1 for n in SIZES}
_EVERYTHING = lambda path, x: True  # noqa: E731


def _pruned(masks):
    return [int((~masks[f"l{n}"]).sum()) for n in SIZES]


@jax.jit
def _jit_local(params, s):
    return jaxprune.masks.unstructured(params, s, where=_EVERYTHING)


@jax.jit
def _prune_local(params, s):
    tx = jaxprune.prune(sparsity=s, where=_EVERYTHING)
    _, state = tx.update(params, tx.init(params), params)
    return state.masks


@jax.jit
def _pruned_local(params, s):
    tx = jaxprune.pruned(optax.sgd(0.1), sparsity=s, where=_EVERYTHING)
    _, state = tx.update(params, tx.init(params), params)
    return state.prune_state.masks


@settings(max_examples=12, deadline=None)
@given(st.one_of(st.floats(0.0, 0.9375, width=32),
                 st.sampled_from([0.9, 0.35, 0.0005, 0.5, 0.25, 0.3])))
def test_eager_jit_prune_pruned_sparse_training_lottery_and_structured_count_alike(s):
    per_leaf = [reference(s, n) for n in SIZES]
    total = reference(s, sum(SIZES))
    assert _pruned(_jit_local(PARAMS, s)) == per_leaf
    assert _pruned(_prune_local(PARAMS, s)) == per_leaf
    assert _pruned(_pruned_local(PARAMS, s)) == per_leaf
    assert _pruned(lottery.prune_round(PARAMS, None, s, scope="local", where=_EVERYTHING)) == per_leaf
    assert _pruned(S.random_masks(PARAMS, s, jax.random.key(0), distribution="uniform",
                                  where=_EVERYTHING)) == per_leaf
    groups = [Group([(f"l{n}", 0)], n) for n in SIZES]
    scores = [np.asarray(PARAMS[f"l{n}"][:, 0]) for n in SIZES]
    assert [n - k.size for n, k in zip(SIZES, select_channels(groups, scores, s))] == per_leaf
    removed = sum(n - k.size for n, k in zip(SIZES, select_channels(groups, scores, s,
                                                                    scope="global")))
    assert removed == total
    masks = jaxprune.masks.unstructured(PARAMS, s, scope="global", where=_EVERYTHING)
    assert sum(_pruned(masks)) == total


def test_drop_and_grow_drops_the_rule_count_of_active_entries():
    # 35 active of 100; each update drops round(float32(0.9) * 35) = 31 (eager float64 would say 32).
    mask = jnp.arange(100) < 35
    w = jnp.arange(1.0, 101.0)
    grow = (~mask).astype(jnp.float32)  # grown: the earliest originally inactive entries
    new = jax.jit(S.drop_and_grow)(mask, w, grow, 0.9)
    assert not bool(new[:31].any()) and bool(new[31:35].all())
    assert int(new.sum()) == 35


@settings(deadline=None, max_examples=15)
@given(st.lists(st.tuples(st.floats(0, 1, width=32), st.integers(1, 2**31),
                          st.sampled_from(["python", "traced", "shared"])), min_size=1, max_size=6))
def test_prune_counts_equals_prune_count_per_leaf(cases):
    # The vectorised count used under jit (one program for all leaves) must give
    # each leaf exactly the count of the one rule, whether its sparsity is a
    # Python float, a traced value of its own, or one traced value shared by leaves.
    sizes = [n for _, n, _ in cases]

    @jax.jit  # both under one jit: the Python values are baked in, so each example compiles
    def counts_and_vector(traced, shared):
        sparsities = [s if kind == "python" else shared if kind == "shared" else traced[i]
                      for i, (s, _, kind) in enumerate(cases)]
        return ([jnp.asarray(c, jnp.uint32) for c in threshold.prune_counts(sparsities, sizes)],
                threshold.prune_count_vector(sparsities, sizes))

    shared = jnp.float32(cases[0][0])
    traced = jnp.asarray([s for s, _, _ in cases], jnp.float32)
    expected = [reference(cases[0][0] if kind == "shared" else s, n) for s, n, kind in cases]
    counts, vector = counts_and_vector(traced, shared)
    assert [int(c) for c in counts] == expected
    assert [int(c) for c in vector] == expected


def test_prune_counts_refuse_mismatched_lengths():
    for fn in (threshold.prune_counts, threshold.prune_count_vector):
        with pytest.raises(ValueError, match="sparsities has 2 entries but sizes has 1"):
            fn([0.5, 0.5], [10])


def test_select_stacked_rows_counts_each_row_and_refuses_mismatched_lists():
    part = jnp.asarray(np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::-1].copy())
    keep = threshold.select_stacked_rows([part], [None], [jnp.asarray([0, 3, 8])])[0]
    assert [int(k.sum()) for k in keep] == [8, 5, 0]
    # The 3 lowest scores of row 1 are its last three columns (scores descend).
    assert np.asarray(keep[1]).tolist() == [True] * 5 + [False] * 3
    with pytest.raises(ValueError, match="1 stacks, 2 kept masks"):
        threshold.select_stacked_rows([part], [None, None], [jnp.asarray([0, 3, 8])])
