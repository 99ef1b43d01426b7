"""Exactness properties of jaxprune.masks (hypothesis) and its bad-input errors."""

import fractions
import functools
import warnings

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune
from jaxprune import masks as M


def count_rule(s, n):
    """The documented count: float32(s) * n exactly, rounded half to even."""
    return round(fractions.Fraction(float(np.float32(s))) * n)


def reference_prune(leaves, sparsity):
    """Stable sort by (value, leaf order, flat index) with NaN lowest: the spec."""
    vals = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    vals = np.where(np.isnan(vals), -np.inf, vals)
    nan_first = np.concatenate([np.isnan(np.asarray(x, np.float64).ravel()) for x in leaves])
    order = np.lexsort((np.arange(len(vals)), vals, ~nan_first))
    k = count_rule(sparsity, len(vals))
    keep = np.ones(len(vals), bool)
    keep[order[:k]] = False
    out, start = [], 0
    for x in leaves:
        out.append(keep[start:start + np.size(x)].reshape(np.shape(x)))
        start += np.size(x)
    return out


# Few distinct values so that ties are common; a few fixed shapes so that
# compiled kernels are reused across examples.
small_ints = st.integers(-3, 3).map(float)
SHAPES = [(1, 1), (2, 3), (4, 4), (2, 2, 3)]
sparsities = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25]), st.floats(0.0, 1.0))
# Lists of leaves are drawn from fixed lists of SHAPES (every list compiles its
# selection once; values and sparsities vary freely): one leaf, different
# shapes, and equal shapes apart (stacked out of leaf order).
SHAPE_LISTS = [[(1, 1)], [(2, 3), (4, 4)], [(2, 2, 3), (1, 1), (2, 2, 3)],
               [(4, 4), (2, 3), (4, 4)]]
leaf_lists = st.sampled_from(SHAPE_LISTS).flatmap(lambda shapes: st.tuples(
    *[hnp.arrays(np.float32, shape, elements=small_ints) for shape in shapes]).map(list))


@settings(max_examples=20)
@given(leaf_lists, sparsities)
def test_global_scope_prunes_exact_count_with_ties(leaves, s):
    # min_density=0.0: the unguarded ranking is the spec (the guard has its own tests).
    params = {f"l{i}": jnp.asarray(x) for i, x in enumerate(leaves)}
    got = M.unstructured(params, s, scope="global", min_density=0.0, signed=True)
    ref = reference_prune([params[k] for k in sorted(params)], s)
    for k, r in zip(sorted(params), ref):
        np.testing.assert_array_equal(np.asarray(got[k]), r, err_msg=k)
    n = sum(x.size for x in leaves)
    assert sum(int((~got[k]).sum()) for k in params) == count_rule(s, n)


@settings(max_examples=20)
@given(leaf_lists, sparsities)
def test_local_scope_prunes_exact_count_per_leaf(leaves, s):
    params = [jnp.asarray(x) for x in leaves]
    got = M.unstructured(params, s, scope="local", signed=True)
    for x, g in zip(params, got):
        np.testing.assert_array_equal(np.asarray(g), reference_prune([x], s)[0])
        assert int((~g).sum()) == count_rule(s, x.size)


_jit_global = jax.jit(functools.partial(M.unstructured, scope="global", signed=True))


@given(hnp.arrays(np.float32, (4, 5), elements=small_ints),
       hnp.arrays(np.float32, (3, 3), elements=small_ints), sparsities)
def test_jit_with_traced_sparsity_matches_eager(a, b, s):
    # One count rule: a Python float and a traced float32 prune the same entries.
    params = (jnp.asarray(a), jnp.asarray(b))
    eager = M.unstructured(params, s, scope="global", signed=True)
    jitted = _jit_global(params, jnp.float32(s))
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)


@given(hnp.arrays(np.float32, (8, 16), elements=st.floats(-10, 10, width=32)),
       st.floats(0, 1), st.floats(0, 1))
def test_magnitude_masks_nest_as_sparsity_grows(w, s1, s2):
    s1, s2 = sorted((s1, s2))
    scores = jaxprune.scores.magnitude({"w": jnp.asarray(w)})
    for scope in ("local", "global"):
        m1 = M.unstructured(scores, s1, scope=scope)["w"]
        m2 = M.unstructured(scores, s2, scope=scope)["w"]
        assert not bool(jnp.any(m2 & ~m1)), "a weight kept at higher sparsity was pruned at lower"


def test_sparsity_zero_keeps_all_and_one_prunes_all_selected():
    p = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    assert bool(M.unstructured(p, 0.0)["w"].all())
    assert not bool(M.unstructured(p, 1.0, scope="global")["w"].any())
    assert M.unstructured(p, 1.0)["b"] is None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_leaves_give_exact_counts(dtype):
    w = jax.random.normal(jax.random.key(0), (32, 32)).astype(dtype)
    m = M.unstructured({"w": w}, 0.7, scope="global", signed=True)["w"]
    assert int((~m).sum()) == round(0.7 * 1024)
    ref = reference_prune([np.asarray(w.astype(jnp.float32))], 0.7)[0]
    np.testing.assert_array_equal(np.asarray(m), ref)


def test_float64_leaves_use_wide_keys_and_keep_full_precision():
    with jax.enable_x64(True):
        base = 1.0 + np.arange(6) * 1e-12  # equal in float32, distinct in float64
        w = jnp.asarray(base[::-1].reshape(2, 3), jnp.float64)
        m = M.unstructured({"w": w}, 0.5)["w"]
        assert m.tolist() == [[True, True, True], [False, False, False]]


def test_integer_leaves_are_never_selected_by_default():
    p = {"w": jnp.ones((4, 4)), "step": jnp.zeros((4, 4), jnp.int32)}
    assert M.unstructured(p, 0.5)["step"] is None
    with pytest.raises(ValueError, match="selects no leaf"):
        M.unstructured({"step": jnp.zeros((4, 4), jnp.int32)}, 0.5)


def test_nan_scores_rank_lowest_and_are_pruned_first():
    w = jnp.array([[jnp.nan, 0.1, 5.0, -jnp.inf]])
    m = M.unstructured({"w": w}, 0.25, signed=True)["w"]
    assert m.tolist() == [[False, True, True, True]]
    m = M.unstructured({"w": w}, 0.5, signed=True)["w"]
    assert m.tolist() == [[False, True, True, False]]


def test_vmap_builds_many_masks_at_once():
    ws = jnp.abs(jax.random.normal(jax.random.key(1), (5, 6, 7)))
    batched = jax.vmap(lambda w: M.unstructured({"w": w}, 0.4)["w"])(ws)
    for i in range(5):
        np.testing.assert_array_equal(batched[i], M.unstructured({"w": ws[i]}, 0.4)["w"])
    sweep = jax.vmap(lambda s: M.unstructured({"w": ws[0]}, s)["w"])(jnp.linspace(0, 1, 5))
    assert [int((~m).sum()) for m in sweep] == [0, 10, 21, 32, 42]


def test_sharded_scores_give_the_same_global_mask():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    p = {"a": jax.random.normal(jax.random.key(2), (8, 16)),
         "b": jax.random.normal(jax.random.key(3), (16, 8))}
    sharded = jax.device_put(p, sharding)
    got = jax.jit(lambda p: M.unstructured(p, 0.6, scope="global"))(sharded)
    jax.tree.map(np.testing.assert_array_equal, got, M.unstructured(p, 0.6, scope="global"))
    assert got["a"].sharding.is_equivalent_to(sharding, 2)


def test_erk_distribution_hits_total_count_and_favours_small_layers():
    p = {"big": jnp.ones((128, 128)), "small": jnp.ones((128, 8))}
    scores = jax.tree.map(lambda x: jax.random.uniform(jax.random.key(0), x.shape), p)
    m = M.unstructured(scores, 0.9, distribution="erk")
    assert abs(float(jaxprune.sparsity(m)) - 0.9) < 1e-3
    assert float(m["small"].mean()) > float(m["big"].mean())


def test_mapping_sparsity_applies_per_path_and_names_unmatched_leaf():
    p = {"Dense_0": {"kernel": jnp.arange(16.0).reshape(4, 4)},
         "Dense_1": {"kernel": jnp.arange(16.0).reshape(4, 4)}}
    m = M.unstructured(p, {"Dense_0": 0.25, "Dense_1": 0.75})
    assert int((~m["Dense_0"]["kernel"]).sum()) == 4
    assert int((~m["Dense_1"]["kernel"]).sum()) == 12
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        M.unstructured(p, {"Dense_0": 0.5})


def test_min_density_prevents_layer_collapse_under_global_scope():
    p = {"tiny": jnp.full((4, 4), 0.01), "huge": jnp.full((16, 16), 1.0)}
    collapsed = M.unstructured(p, 0.2, scope="global", min_density=0.0)  # the explicit opt-out
    assert not bool(collapsed["tiny"].any())
    guarded = M.unstructured(p, 0.2, scope="global", min_density=0.25)
    assert int(guarded["tiny"].sum()) == 4
    assert sum(int((~x).sum()) for x in jax.tree.leaves(guarded)) == round(0.2 * 272)


@pytest.mark.parametrize("normalize", ["l2", "lamp"])
def test_normalized_global_ranking_keeps_exact_count(normalize):
    p = {"a": jax.random.normal(jax.random.key(0), (8, 8)) * 100,
         "b": jax.random.normal(jax.random.key(1), (8, 8))}
    m = M.unstructured(jaxprune.scores.magnitude(p), 0.5, scope="global", normalize=normalize)
    assert sum(int((~x).sum()) for x in jax.tree.leaves(m)) == 64
    assert int(m["b"].sum()) > 8  # without normalisation layer b would be nearly emptied


def test_lamp_matches_its_definition():
    w = jnp.array([[1.0, 3.0, 2.0]])
    lamp = M._lamp(w)
    u = np.array([1.0, 9.0, 4.0])
    expected = [1 / 14, 9 / 9, 4 / 13]
    np.testing.assert_allclose(lamp.ravel(), expected, rtol=1e-6)
    assert u.sum() == 14


@given(hnp.arrays(np.float32, (3, 8), elements=small_ints), st.sampled_from([(1, 2), (2, 4), (1, 4), (0, 4), (4, 4)]))
def test_n_of_m_keeps_exactly_n_in_every_group(w, nm):
    n, m = nm
    for axis in (0, 1):
        if w.shape[axis] % m:
            continue
        got = M.n_of_m({"w": jnp.asarray(w)}, n, m, axis=axis, signed=True)["w"]
        groups = np.moveaxis(np.asarray(got), axis, -1).reshape(-1, m)
        assert (groups.sum(-1) == n).all()
        vals = np.moveaxis(w, axis, -1).reshape(-1, m)
        for g, v in zip(groups, vals):  # kept entries are the top-n, ties to later index
            ref = np.lexsort((np.arange(m), v))[m - n:]
            assert set(np.flatnonzero(g)) == set(ref)


def test_block_masks_prune_whole_blocks_with_exact_block_count():
    w = jax.random.normal(jax.random.key(0), (3, 8, 12))
    m = M.block({"w": w}, 0.5, (2, 4), where=lambda p, x: True)["w"]
    tiles = np.asarray(m).reshape(3, 4, 2, 3, 4)
    assert (tiles.all(axis=(2, 4)) | ~tiles.any(axis=(2, 4))).all()
    assert int((~tiles.any(axis=(2, 4))).sum()) == round(0.5 * 36)


def test_channel_masks_prune_whole_slices_local_and_global():
    p = {"a": jax.random.normal(jax.random.key(0), (6, 10)),
         "b": jax.random.normal(jax.random.key(1), (10, 4))}
    scores = jaxprune.scores.magnitude(p)
    local = M.channels(scores, 0.5, axis=-1)
    for x in jax.tree.leaves(local):
        cols = np.asarray(x)
        assert (cols.all(0) | ~cols.any(0)).all()
        assert int((~cols.all(0)).sum()) == round(0.5 * cols.shape[1])
    glob = M.channels(scores, 0.5, axis=-1, scope="global")
    assert sum(int((~np.asarray(x).all(0)).sum()) for x in jax.tree.leaves(glob)) == 7


def test_masks_work_on_flax_linen_and_nnx_state():
    import flax.linen as nn
    from flax import nnx
    variables = nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 4)))
    m = M.unstructured(jaxprune.scores.magnitude(variables), 0.5)
    assert m["params"]["bias"] is None and m["params"]["kernel"].shape == (4, 8)
    state = nnx.state(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Param)
    ms = M.unstructured(jaxprune.scores.magnitude(state), 0.5, where="kernel")
    pruned = jaxprune.apply_masks(state, ms)
    assert float(jaxprune.sparsity(pruned, where="kernel")) == 0.5
    assert jaxprune.tree.paths(state) == jaxprune.tree.paths(state.to_pure_dict())


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        M.unstructured({"w": jnp.ones((2, 2))}, bad)


def test_n_greater_than_m_or_indivisible_axis_is_rejected_with_path():
    with pytest.raises(ValueError, match="n <= m"):
        M.n_of_m({"w": jnp.ones((4, 4))}, 5, 4)
    with pytest.raises(ValueError, match="'layer/w'.*length 6 on axis 1, not a multiple of m=4"):
        M.n_of_m({"layer": {"w": jnp.ones((4, 6))}}, 2, 4, axis=1)


def test_missing_axis_and_bad_block_shape_name_the_path():
    with pytest.raises(ValueError, match="'w'.*axis=2 does not exist"):
        M.channels({"w": jnp.ones((4, 6))}, 0.5, axis=2)
    with pytest.raises(ValueError, match="'w'.*not divisible into blocks"):
        M.block({"w": jnp.ones((4, 6))}, 0.5, (4, 4))
    with pytest.raises(ValueError, match="'v'.*block masks need 2"):
        M.block({"v": jnp.ones(8)}, 0.5, (2, 2), where="v")


def test_where_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no leaf"):
        M.unstructured({"w": jnp.ones((4, 4))}, 0.5, where="nope")


def test_global_scope_rejects_per_leaf_options():
    with pytest.raises(ValueError, match="scope='local'"):
        M.unstructured({"w": jnp.ones((4, 4))}, 0.5, scope="global", distribution="erk")
    with pytest.raises(ValueError, match="scope must be"):
        M.unstructured({"w": jnp.ones((4, 4))}, 0.5, scope="everywhere")


# --- issue 10 / 11: safe defaults and refusals ---------------------------------

def _density(masks):
    return {p: float(m.mean()) for p, m in jaxprune.tree.leaves_with_paths(masks)}


def test_global_scope_guards_every_leaf_by_default_and_says_so():
    # A leaf of small weights next to a big one: one threshold would empty it.
    p = {"small": jnp.full((8, 8), 0.01), "big": jax.random.normal(jax.random.key(0), (64, 64))}
    scores = jaxprune.scores.magnitude(p)
    with pytest.warns(jaxprune.PruningWarning, match=r"'small'.*layer collapse.*min_density=0\.0"):
        guarded = M.unstructured(scores, 0.9, scope="global")
    n_small = 64 - count_rule(0.9, 64)  # small's uniform share: 6 entries, floor ceil(6 / 10) = 1
    assert int(guarded["small"].sum()) == -(-n_small // M.GUARD_SHARE) == 1
    total = 64 + 4096
    assert sum(int((~m).sum()) for m in jax.tree.leaves(guarded)) == count_rule(0.9, total)
    # The guarded masks are the unguarded ones with small's top entry traded for big's last.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the explicit opt-out says nothing
        collapsed = M.unstructured(scores, 0.9, scope="global", min_density=0.0)
        assert not bool(collapsed["small"].any())
        # No leaf near collapse: no warning, the same masks as without the guard.
        roomy = dict(scores, small=jnp.full((8, 8), 3.0))
        jax.tree.map(np.testing.assert_array_equal, M.unstructured(roomy, 0.9, scope="global"),
                     M.unstructured(roomy, 0.9, scope="global", min_density=0.0))


def test_global_channel_masks_never_remove_every_channel_of_a_leaf():
    p = {"a": jnp.full((4, 8), 0.01), "b": jax.random.normal(jax.random.key(1), (4, 64))}
    with pytest.warns(jaxprune.PruningWarning, match="'a'"):
        m = M.channels(jaxprune.scores.magnitude(p), 0.8, scope="global")
    assert int(np.asarray(m["a"]).all(0).sum()) >= 1
    off = M.channels(jaxprune.scores.magnitude(p), 0.8, scope="global", min_density=0.0)
    assert not bool(off["a"].any())


def test_guard_that_cannot_fit_the_sparsity_is_an_error_naming_the_opt_out():
    p = {f"l{i}": jnp.full((2, 2), float(i + 1)) for i in range(4)}  # 16 entries, 4 leaves
    with pytest.raises(ValueError, match="min_density=0.0"):
        M.unstructured(p, 0.9, scope="global", min_density=0.5)


def test_negative_scores_warn_with_the_fix_unless_signed():
    w = {"w": jnp.array([[-3.0, 1.0], [2.0, -0.5]])}
    with pytest.warns(jaxprune.PruningWarning, match=r"'w'.*negative.*scores\.magnitude"):
        M.unstructured(w, 0.5)
    with pytest.warns(jaxprune.PruningWarning, match="negative"):
        jax.jit(lambda w: M.unstructured(w, 0.5, scope="global"))(w)
    with pytest.warns(jaxprune.PruningWarning, match="negative"):
        M.n_of_m({"w": jnp.array([[-1.0], [1.0], [2.0], [3.0]])}, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.unstructured(w, 0.5, signed=True)
        M.unstructured(jaxprune.scores.magnitude(w), 0.5)


def test_float64_scores_warn_when_x64_is_off():
    near = np.array([[1.0, 1.0 + 1e-12], [1.0 + 2e-12, 1.0 + 3e-12]])
    with pytest.warns(jaxprune.PruningWarning, match=r"'w'.*float64.*jax_enable_x64"):
        M.unstructured({"w": near}, 0.5)


def test_integer_scores_are_ranked_exactly_not_through_float32():
    big = {"w": jnp.array([[2**31 - 1, 2**31 - 2], [5, 1]], jnp.int32)}
    m = M.unstructured(big, 0.75, where=lambda p, x: True)["w"]
    assert m.tolist() == [[True, False], [False, False]]
    u = {"w": jnp.array([[2**32 - 1, 2**32 - 2], [7, 1]], jnp.uint32)}
    assert M.unstructured(u, 0.75, where=lambda p, x: True)["w"].tolist() == [[True, False],
                                                                               [False, False]]
    with pytest.raises(TypeError, match="mix integer and floating"):
        M.unstructured({"i": big["w"], "f": jnp.ones((2, 2))}, 0.5, scope="global",
                       where=lambda p, x: True)


@pytest.mark.parametrize("bad", ["1.5", "-1", None, True, jnp.array([0.5]), np.array([0.5, 0.5])])
def test_non_number_sparsities_are_rejected_naming_the_argument(bad):
    with pytest.raises(TypeError, match="sparsity"):
        M.unstructured({"w": jnp.ones((2, 2))}, bad)
    with pytest.raises(TypeError, match="sparsity"):
        M.unstructured({"w": jnp.ones((2, 2))}, bad, scope="global")
    with pytest.raises(TypeError, match="sparsity"):
        jaxprune.prune(sparsity=bad)
    with pytest.raises(TypeError, match="fraction"):
        jaxprune.lottery.prune_round({"w": jnp.ones((2, 2))}, None, bad)


def test_traced_sparsity_outside_unit_interval_warns_instead_of_clipping_silently():
    with pytest.warns(jaxprune.PruningWarning, match="sparsity 1.5 is outside"):
        jax.jit(lambda s: M.unstructured({"w": jnp.ones((2, 2))}, s))(1.5)


def test_global_only_options_with_local_scope_are_errors():
    with pytest.raises(ValueError, match="normalize='lamp'.*scope='local'"):
        M.unstructured({"w": jnp.ones((2, 2))}, 0.5, normalize="lamp")
    with pytest.raises(ValueError, match="min_density=0.1.*scope='local'"):
        M.unstructured({"w": jnp.ones((2, 2))}, 0.5, min_density=0.1)
    with pytest.raises(ValueError, match="min_density"):
        M.channels({"w": jnp.ones((2, 2))}, 0.5, min_density=0.1)
    with pytest.raises(ValueError, match="normalize"):
        jaxprune.prune(normalize="l2")


def test_n_of_m_defaults_to_the_reduction_axis_of_dense_and_conv_kernels():
    p = {"Dense_0": {"kernel": jax.random.uniform(jax.random.key(0), (16, 10))},   # (in, out)
         "Conv_0": {"kernel": jax.random.uniform(jax.random.key(1), (3, 3, 8, 6))}}  # (h, w, in, out)
    m = M.n_of_m(p, 2, 4)
    dense = np.asarray(m["Dense_0"]["kernel"])  # 10 outputs: axis -1 would not divide
    assert (dense.reshape(4, 4, 10).sum(1) == 2).all()
    conv = np.asarray(m["Conv_0"]["kernel"])
    assert (conv.reshape(3, 3, 2, 4, 6).sum(3) == 2).all()
    with pytest.raises(ValueError, match=r"'head/kernel'.*length 10 on its reduction axis 0.*axis="):
        M.n_of_m({"head": {"kernel": jnp.ones((10, 4))}}, 2, 4)


def guarded_reference(leaves, s, min_density):
    """Every leaf's top floor entries protected, then the lowest of the rest by
    (value, leaf order, flat index): what the layer-collapse guard must select."""
    n = [x.size for x in leaves]
    if min_density is None:
        floors = [-(-(k - count_rule(s, k)) // M.GUARD_SHARE) for k in n]
    else:
        floors = [min(int(np.ceil(min_density * k)), k) for k in n]
    protected = []
    for x, f in zip(leaves, floors):
        order = np.lexsort((np.arange(x.size), x.ravel()))  # ascending; ties: earlier first
        p = np.zeros(x.size, bool)
        p[order[x.size - f:]] = True
        protected.append(p)
    vals = np.concatenate([x.ravel() for x in leaves]).astype(np.float64)
    prot = np.concatenate(protected)
    k = min(count_rule(s, sum(n)), sum(n) - sum(floors))
    order = np.lexsort((np.arange(vals.size), vals, prot))
    keep = np.ones(vals.size, bool)
    keep[order[:k]] = False
    return np.split(keep, np.cumsum(n)[:-1])


_jit_guarded = jax.jit(lambda xs, s: M.unstructured(xs, s, scope="global"))


@settings(max_examples=12)
@given(st.tuples(hnp.arrays(np.float32, (4, 4), elements=st.integers(0, 3).map(float)),
                 hnp.arrays(np.float32, (2, 8), elements=st.integers(0, 3).map(float)),
                 hnp.arrays(np.float32, (8, 2), elements=st.integers(0, 3).map(float))),
       st.floats(0.0, 0.96875, width=32), st.sampled_from([None, 0.25]))
def test_layer_collapse_guard_equals_protecting_every_floor_at_once(leaves, s, min_density):
    leaves = tuple(x * (i + 1) ** 3 for i, x in enumerate(leaves))  # very different scales
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxprune.PruningWarning)
        try:
            eager = M.unstructured(leaves, s, scope="global", min_density=min_density)
        except ValueError as e:  # floors that exceed what s keeps are refused eagerly
            assert "min_density" in str(e)
            return
        traced = (_jit_guarded(leaves, jnp.float32(s)) if min_density is None else eager)
    for got in (eager, traced):
        for g, r in zip(got, guarded_reference([np.asarray(x) for x in leaves], s, min_density)):
            np.testing.assert_array_equal(np.asarray(g).ravel(), r)


@settings(max_examples=10, deadline=None)
@given(st.tuples(*[hnp.arrays(np.float32, shape, elements=st.integers(0, 3).map(float))
                   for shape in [(4, 4), (4, 4), (2, 8), (4, 4), (2, 8)]]),
       st.floats(0.5, 0.96875, width=32))
def test_guard_over_stacks_of_equal_leaves_matches_the_reference(leaves, s):
    # Equal shapes are stacked into one array per shape inside the jitted guard
    # (leaf_groups): leaf order, floors and ties must survive the stacking.
    leaves = tuple(x * (i + 1) ** 3 for i, x in enumerate(leaves))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxprune.PruningWarning)
        try:
            M.unstructured(leaves, s, scope="global")
        except ValueError:
            return
        traced = _jit_guarded(leaves, jnp.float32(s))
    for g, r in zip(traced, guarded_reference([np.asarray(x) for x in leaves], s, None)):
        np.testing.assert_array_equal(np.asarray(g).ravel(), r)


# Module level: one compile per list length (2, 3 or 4 leaves), not one per example.
_jit_signed_local = jax.jit(lambda ls, s: M.unstructured(ls, s, signed=True))


@settings(max_examples=10, deadline=None)
@given(st.lists(hnp.arrays(np.float32, (3, 4), elements=st.sampled_from([0.0, 1.0, 2.0, np.nan])),
                min_size=2, max_size=4), st.floats(0.0, 1.0, width=32))
def test_local_masks_of_equal_leaves_match_each_leaf_alone(leaves, s):
    # One lax.map over the stack of equal leaves must equal one selection per leaf.
    got = _jit_signed_local(leaves, jnp.float32(s))
    for x, g in zip(leaves, got):
        alone = M.unstructured([x], float(s), signed=True)[0]
        np.testing.assert_array_equal(np.asarray(g), np.asarray(alone))
