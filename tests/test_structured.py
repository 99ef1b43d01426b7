"""Groups, importance, plans, shrinking and errors of jaxprune.structured."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as hst
from jax.extend.core import Primitive

from jaxprune import structured as st
from jaxprune.structured import StructuredPruningError

TOL = dict(atol=1e-5, rtol=1e-5)


def mlp(v, x):
    h = jax.nn.relu(x @ v["w1"] + v["b1"])
    return h @ v["w2"]


def mlp_vars(key=0, d=4, h=16, o=3):
    k = jax.random.split(jax.random.key(key), 3)
    return {"w1": jax.random.normal(k[0], (d, h)), "b1": jax.random.normal(k[1], (h,)),
            "w2": jax.random.normal(k[2], (h, o))}


X = jax.random.normal(jax.random.key(9), (2, 4))


# ------------------------------------------------------------------ groups
def test_groups_couple_kernel_bias_and_next_input():
    (g,) = st.groups(mlp, mlp_vars(), X)
    assert g.members == [("b1", 0), ("w1", 1), ("w2", 0)]
    assert g.size == 16


def test_group_prints_each_member_path_and_axis():
    (g,) = st.groups(mlp, mlp_vars(), X)
    text = str(g)
    assert "w1  axis 1" in text and "w2  axis 0" in text and "size=16" in text


def test_groups_need_only_abstract_inputs():
    v = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mlp_vars())
    (g,) = st.groups(mlp, v, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    assert g.size == 16


def test_input_and_output_axes_are_not_prunable_unless_opted_in():
    assert len(st.groups(mlp, mlp_vars(), X)) == 1
    sizes = sorted(g.size for g in st.groups(mlp, mlp_vars(), X, prunable_io=True))
    assert sizes == [3, 4, 16]


def test_prunable_io_shrinks_inputs_and_outputs_when_opted_in():
    v = mlp_vars()
    r = st.prune_function(mlp, v, X, sparsity=0.5, prunable_io=True, min_channels=1)
    assert r.variables["w1"].shape == (2, 8) and r.variables["w2"].shape == (8, 1)
    out = r.apply(r.variables, X)  # full-width input; removed features are dropped
    full = mlp(st.zero_removed(v, r.plan), X)
    keep = st.kept_positions(r.plan)[("w2", 1)]
    np.testing.assert_allclose(out, full[:, keep], **TOL)


def test_residual_add_ties_both_sides():
    def f(v, x):
        h = x @ v["a"]
        return (h + jnp.tanh(h @ v["b"])) @ v["c"]
    v = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 8)), "c": jnp.ones((8, 2))}
    (g,) = st.groups(f, v, X)
    assert g.members == [("a", 1), ("b", 0), ("b", 1), ("c", 0)]


def test_reshape_into_heads_makes_heads_and_head_dims_separate_groups():
    def f(v, x):
        h = (x @ v["qkv"]).reshape(2, 3, 4)  # 3 heads x 4 dims
        h = jnp.tanh(h) * v["scale"][:, None]  # per-head scale
        return h.reshape(2, 12) @ v["out"]
    v = {"qkv": jnp.ones((4, 12)), "scale": jnp.ones(3), "out": jnp.ones((12, 2))}
    gs = st.groups(f, v, X)
    heads = next(g for g in gs if ("scale", 0) in g.members)
    dims = next(g for g in gs if ("scale", 0) not in g.members)
    assert heads.size == 3 and dims.size == 4
    assert heads.layouts[heads.members.index(("qkv", 1))] == tuple(np.repeat(np.arange(3), 4))
    r = st.prune_function(f, v, X, sparsity=0.34)
    # Every dimension loses a third: heads (the scale's axis) 3 -> 2, so the
    # 12 = 3 x 4 axis keeps 2 x 4, not 2 x 3 (the fraction compounded per factor).
    assert r.variables["qkv"].shape == (4, 8)
    np.testing.assert_allclose(r.apply(r.variables, X), f(st.zero_removed(v, r.plan), X), **TOL)


def test_strided_slice_freezes_the_axis():
    f = lambda v, x: (x @ v["a"])[:, ::2] @ v["b"]
    v = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 2))}
    assert st.groups(f, v, X) == []


def test_iota_along_pruned_axis_uses_kept_indices():
    def f(v, x):
        h = x @ v["a"] + jnp.arange(8.0)
        return h @ v["b"]
    v = {"a": jax.random.normal(jax.random.key(1), (4, 8)), "b": jnp.ones((8, 2))}
    r = st.prune_function(f, v, X, sparsity=0.5)
    np.testing.assert_allclose(r.apply(r.variables, X), f(st.zero_removed(v, r.plan), X), **TOL)


def test_sub_jaxprs_of_jit_custom_vjp_remat_cond_while_are_followed():
    @jax.custom_vjp
    def act(h):
        return jnp.tanh(h)
    act.defvjp(lambda h: (jnp.tanh(h), h), lambda h, g: (g * (1 - jnp.tanh(h) ** 2),))

    def f(v, x):
        h = jax.jit(lambda a, b: a @ b)(x, v["a"])
        h = jax.checkpoint(lambda z: act(z) + jax.nn.gelu(z))(h)
        h = jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, h)
        h = jax.lax.fori_loop(0, 2, lambda i, z: z * v["s"], h)
        return h @ v["b"]
    v = {"a": jax.random.normal(jax.random.key(1), (4, 8)), "s": jnp.linspace(0.5, 1.5, 8),
         "b": jnp.ones((8, 2))}
    (g,) = st.groups(f, v, X)
    assert g.members == [("a", 1), ("b", 0), ("s", 0)]
    r = st.prune_function(f, v, X, sparsity=0.5)
    np.testing.assert_allclose(r.apply(r.variables, X), f(st.zero_removed(v, r.plan), X), **TOL)
    grads = jax.grad(lambda w: r.apply(w, X).sum())(r.variables)
    assert np.abs(grads["a"]).sum() > 0


def test_cached_sub_jaxpr_called_twice_does_not_couple_call_sites():
    act = jax.jit(jnp.tanh)

    def f(v, x):
        h1 = act(x @ v["a"])
        h2 = act(h1 @ v["b"])
        return h2 @ v["c"]
    v = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 8)), "c": jnp.ones((8, 2))}
    assert len(st.groups(f, v, X)) == 2


# ------------------------------------------------------------------ bad input
_mystery = Primitive("mystery_op")  # no rule, and it reverses its last axis (never equivariant)
_mystery.def_impl(lambda x: x[..., ::-1])
_mystery.def_abstract_eval(lambda x: x)


def test_unknown_primitive_raises_naming_it_and_the_equation():
    f = lambda v, x: _mystery.bind(x @ v["a"]) @ v["b"]
    v = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
    with pytest.raises(StructuredPruningError, match="mystery_op.*equation"):
        st.groups(f, v, X)


def test_unknown_primitive_away_from_the_variables_is_tolerated():
    def f(v, x, m):
        return jnp.tanh(x @ v["a"]) @ v["b"] * _mystery.bind(m).sum()
    v = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
    (g,) = st.groups(f, v, X, jnp.ones((3, 3)))
    assert g.size == 8


def test_example_inputs_that_do_not_match_the_model_raise_clearly():
    with pytest.raises(StructuredPruningError, match=r"example inputs of shapes \[\(2, 5\)\]"):
        st.groups(mlp, mlp_vars(), jnp.ones((2, 5)))


def test_sparsity_that_removes_every_channel_of_a_group_raises():
    with pytest.raises(StructuredPruningError, match="every channel.*'b1' axis 0"):
        st.prune_function(mlp, mlp_vars(), X, sparsity=0.99)
    r = st.prune_function(mlp, mlp_vars(), X, sparsity=0.99, min_channels=2)
    assert r.variables["b1"].shape == (2,)


def test_plan_replayed_on_a_different_model_names_the_first_mismatching_path():
    plan = st.plan_for(mlp, mlp_vars(), X)
    with pytest.raises(StructuredPruningError, match="'b1' has shape"):
        st.shrink(mlp, mlp_vars(h=12), plan)
    other = {**mlp_vars(), "extra": jnp.ones(3)}
    with pytest.raises(StructuredPruningError, match="'extra'"):
        st.check_plan(plan, other)


def test_shrunk_forward_rejects_variables_of_the_wrong_shape():
    small, fn = st.shrink(mlp, mlp_vars(), st.plan_for(mlp, mlp_vars(), X))
    with pytest.raises(StructuredPruningError, match="'b1' has shape"):
        fn({**small, "b1": jnp.ones(5)}, X)


# ------------------------------------------------------------------ plans
def test_plan_is_json_and_replays_on_a_fresh_init():
    plan = st.plan_for(mlp, mlp_vars(0), X, sparsity=0.25)
    plan = json.loads(json.dumps(plan))
    fresh = mlp_vars(7)
    small, fn = st.shrink(mlp, fresh, plan)
    assert small["w1"].shape == (4, 12)
    np.testing.assert_allclose(fn(small, X), mlp(st.zero_removed(fresh, plan), X), **TOL)


def test_shrunk_forward_accepts_another_batch_size():
    small, fn = st.shrink(mlp, mlp_vars(), st.plan_for(mlp, mlp_vars(), X))
    assert fn(small, jnp.ones((7, 4))).shape == (7, 3)


def test_group_masks_are_full_shape_and_none_for_untouched_leaves():
    v = {**mlp_vars(), "free": jnp.ones(())}
    f = lambda v, x: mlp(v, x) * v["free"]
    plan = st.plan_for(f, v, X, sparsity=0.5)
    masks = st.group_masks(v, plan)
    assert masks["free"] is None
    assert masks["w1"].shape == (4, 16) and int(masks["w1"][0].sum()) == 8
    gs = st.plan_groups(plan)
    again = st.group_masks(v, gs, kept=[plan["groups"][0]["keep"]])
    np.testing.assert_array_equal(again["w2"], masks["w2"])


# ------------------------------------------------------------------ importance
def _one_group(scale):
    v = {"w1": jnp.ones((4, 8)) * scale, "b1": jnp.zeros(8), "w2": jnp.ones((8, 3))}
    return v, st.groups(mlp, v, X)


def test_l1_importance_keeps_the_largest_channels():
    v, gs = _one_group(jnp.arange(8.0))
    (score,) = st.group_importance(v, gs, "l1")
    np.testing.assert_allclose(score, 4 * np.arange(8.0) + 3)
    (kept,) = st.select_channels(gs, [score], 0.5)
    assert list(kept) == [4, 5, 6, 7]


def test_bn_scale_importance_reads_only_norm_scales():
    f = lambda v, x: (jnp.tanh(x @ v["w"]) * v["norm/scale"]) @ v["out"]
    v = {"w": jnp.ones((4, 6)), "norm/scale": jnp.array([3.0, -5, 1, 0, 2, 4]),
         "out": jnp.ones((6, 2))}
    gs = st.groups(f, v, X)
    (score,) = st.group_importance(v, gs, "bn_scale")
    np.testing.assert_allclose(score, [3, 5, 1, 0, 2, 4])


def test_taylor_importance_needs_grads_and_squares_the_channel_sum():
    v, gs = _one_group(jnp.ones(8))
    with pytest.raises(ValueError, match="grads"):
        st.group_importance(v, gs, "taylor")
    grads = jax.tree.map(jnp.ones_like, v)
    (score,) = st.group_importance(v, gs, "taylor", grads=grads)
    np.testing.assert_allclose(score, 4.0 ** 2 + 3.0 ** 2)


def test_saliency_importance_sums_abs_w_times_g():
    v, gs = _one_group(jnp.ones(8))
    grads = jax.tree.map(lambda x: -jnp.ones_like(x), v)
    (score,) = st.group_importance(v, gs, "saliency", grads=grads)
    np.testing.assert_allclose(score, 4.0 + 3.0)


def test_random_importance_is_reproducible_by_seed():
    v, gs = _one_group(jnp.ones(8))
    a = st.group_importance(v, gs, "random", seed=3)[0]
    b = st.group_importance(v, gs, "random", seed=3)[0]
    np.testing.assert_array_equal(a, b)


def test_lamp_normalization_divides_by_the_suffix_sum():
    v, gs = _one_group(jnp.ones(8))
    (s,) = st.group_importance(v, gs, lambda g, l, gr: np.array([1., 2, 3, 4, 5, 6, 7, 8]),
                               normalize="lamp")
    np.testing.assert_allclose(s[0], 1 / 36)
    np.testing.assert_allclose(s[-1], 1.0)


def test_global_scope_ranks_channels_across_groups():
    def f(v, x):
        return jnp.tanh(x @ v["a"]) @ v["b"] + jnp.tanh(x @ v["c"]) @ v["d"]
    v = {"a": jnp.ones((4, 8)) * 10, "b": jnp.ones((8, 2)), "c": jnp.ones((4, 8)) * 0.1,
         "d": jnp.ones((8, 2))}
    v["a"] = v["a"] * jnp.arange(1, 9)
    v["c"] = v["c"] * jnp.arange(1, 9)
    plan = st.plan_for(f, v, X, sparsity=0.5, scope="global", importance="l1", min_channels=1)
    keeps = {e["members"][0][0]: len(e["keep"]) for e in plan["groups"]}
    # The small group gives up all but its protected best channel, and the exact
    # count (8 of 16) is met by the lowest channel of the other group.
    assert keeps["a"] == 7 and keeps["c"] == 1


# Widths from a fixed set (each compiles its eager ops once; weights vary by seed):
# a multiple of 8, of 4 only, a prime, and the largest.
@settings(deadline=None, max_examples=15)
@given(width=hst.sampled_from([8, 13, 20, 32]), seed=hst.integers(0, 2**16),
       sparsity=hst.floats(0.0, 0.9), round_to=hst.sampled_from([1, 4, 8]))
def test_kept_counts_respect_round_to_and_shrunk_mlp_matches_masked(width, seed, sparsity,
                                                                    round_to):
    v = mlp_vars(seed, h=width)
    plan = st.plan_for(mlp, v, X, sparsity=sparsity, round_to=round_to, min_channels=1)
    n = len(plan["groups"][0]["keep"])
    assert n == width or n % round_to == 0
    assert n >= width - round(sparsity * width)
    small, fn = st.shrink(mlp, v, plan)
    assert st.param_count(small) == 4 * n + n + 3 * n
    np.testing.assert_allclose(fn(small, X), mlp(st.zero_removed(v, plan), X), **TOL)


def test_ignore_keeps_matching_groups_whole():
    v = mlp_vars()
    plan = st.plan_for(mlp, v, X, sparsity=0.5, ignore="w2")
    assert len(plan["groups"][0]["keep"]) == 16
    plan = st.plan_for(mlp, v, X, sparsity=0.5, ignore=lambda g: g.size == 16)
    assert len(plan["groups"][0]["keep"]) == 16


# ------------------------------------------------------------------ group lasso
def test_group_lasso_adds_the_gradient_of_the_l21_penalty():
    v = mlp_vars()
    gs = st.groups(mlp, v, X)
    tx = st.group_lasso(gs, strength=0.5)
    zeros = jax.tree.map(jnp.zeros_like, v)
    upd, _ = tx.update(zeros, tx.init(v), v)
    penalty = lambda p: 0.5 * sum(jnp.sum(n) for n in st.group_norms(p, gs))
    want = jax.grad(penalty)(v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), upd, want)


def test_group_lasso_training_drives_whole_channels_to_zero():
    v = mlp_vars()
    gs = st.groups(mlp, v, X)
    tx = optax.chain(st.group_lasso(gs, strength=0.2), optax.sgd(0.05))
    state = tx.init(v)
    loss = lambda p: 0.01 * jnp.mean((mlp(p, X) - 1.0) ** 2)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s
    before = np.asarray(st.group_norms(v, gs)[0])
    for _ in range(300):
        v, state = step(v, state)
    norms = np.asarray(st.group_norms(v, gs)[0])
    assert (norms < 0.05).sum() >= 4 and norms.sum() < 0.5 * before.sum()


def test_pooling_windows_freeze_spatial_axes_but_not_channels():
    import flax.linen as nn

    def f(v, x):
        h = jax.lax.conv_general_dilated(x, v["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = nn.max_pool(jax.nn.relu(h), (2, 2), strides=(2, 2))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        return h.reshape(h.shape[0], -1) @ v["out"]
    v = {"k": jax.random.normal(jax.random.key(0), (3, 3, 3, 8)),
         "out": jax.random.normal(jax.random.key(1), (2 * 2 * 8, 2))}
    img = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    (g,) = st.groups(f, v, img)
    assert g.members == [("k", 3), ("out", 0)] and g.size == 8
    r = st.prune_function(f, v, img, sparsity=0.5)
    assert r.variables["out"].shape == (16, 2)
    np.testing.assert_allclose(r.apply(r.variables, img), f(st.zero_removed(v, r.plan), img), **TOL)


def test_debug_print_inside_the_model_is_allowed():
    def f(v, x):
        h = x @ v["w1"]
        jax.debug.print("h sum {s}", s=h.sum())
        return jnp.tanh(h) @ v["w2"]
    v = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2))}
    assert len(st.groups(f, v, X)) == 1


def test_linen_plan_replays_on_a_fresh_init_and_rejects_another_width():
    import flax.linen as nn

    class Net(nn.Module):
        width: int = 16

        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(self.width)(x)))

    v = Net().init(jax.random.key(0), X)
    plan = json.loads(json.dumps(st.prune_channels(Net(), v, X, sparsity=0.5).plan))
    fresh = Net().init(jax.random.key(1), X)
    r = st.prune_channels(Net(), fresh, X, plan=plan)
    assert r.plan["groups"][0]["keep"] == plan["groups"][0]["keep"]
    np.testing.assert_allclose(r.module.apply(r.variables, X),
                               Net().apply(st.zero_removed(fresh, plan), X), **TOL)
    other = Net(width=12).init(jax.random.key(1), X)
    with pytest.raises(StructuredPruningError, match=r"'params/Dense_0/kernel' has shape \(12, 2\)"):
        st.prune_channels(Net(width=12), other, X, plan=plan)


# ------------------------------------------------------------------ random architectures
def _block(kind, v, h, k):
    """One block of a random network: returns the new hidden state."""
    if kind == "dense":
        return jax.nn.relu(h @ v[f"d{k}"] + v[f"b{k}"])
    if kind == "residual":
        return h + jnp.tanh(h @ v[f"d{k}"]) @ v[f"e{k}"]
    if kind == "concat":
        return jnp.concatenate([jnp.tanh(h @ v[f"d{k}"]), jax.nn.relu(h @ v[f"e{k}"])], -1)
    if kind == "heads":  # 2 heads x n/2 dims, with a per-head gain
        z = (h @ v[f"d{k}"]).reshape(h.shape[0], 2, -1) * v[f"g{k}"][:, None]
        return jnp.tanh(z).reshape(h.shape[0], -1)
    if kind == "split":
        a, b = jnp.split(h @ v[f"d{k}"], 2, axis=-1)
        return jnp.concatenate([jnp.sin(b), a * 2.0], -1)
    raise ValueError(kind)


def _random_net(kinds, key):
    v, width = {}, 4
    keys = iter(jax.random.split(key, 4 * len(kinds) + 1))
    rnd = lambda *s: jax.random.normal(next(keys), s) / np.sqrt(s[0])
    for k, kind in enumerate(kinds):
        if kind == "dense":
            v[f"d{k}"], v[f"b{k}"], width = rnd(width, 8), rnd(8), 8
        elif kind == "residual":
            v[f"d{k}"], v[f"e{k}"] = rnd(width, 6), rnd(6, width)
        elif kind == "concat":
            v[f"d{k}"], v[f"e{k}"], width = rnd(width, 4), rnd(width, 6), 10
        elif kind == "heads":
            v[f"d{k}"], v[f"g{k}"], width = rnd(width, 8), rnd(2), 8
        else:
            v[f"d{k}"], width = rnd(width, 8), 8
    v["out"] = rnd(width, 2)

    def f(v, x):
        h = x
        for k, kind in enumerate(kinds):
            h = _block(kind, v, h, k)
        return h @ v["out"]
    return f, v


@settings(deadline=None, max_examples=12)
@given(kinds=hst.lists(hst.sampled_from(["dense", "residual", "concat", "heads", "split"]),
                       min_size=1, max_size=4),
       sparsity=hst.sampled_from([0.25, 0.5]), seed=hst.integers(0, 100))
def test_random_networks_shrink_to_exactly_the_masked_model(kinds, sparsity, seed):
    f, v = _random_net(kinds, jax.random.key(seed))
    plan = st.plan_for(f, v, X, sparsity=sparsity, importance="random", seed=seed,
                       min_channels=1)
    small, fn = st.shrink(f, v, plan)
    assert st.param_count(small) <= st.param_count(v)
    np.testing.assert_allclose(fn(small, X), f(st.zero_removed(v, plan), X), **TOL)


def test_describe_reports_group_widths_and_the_shrunk_size():
    r = st.prune_function(mlp, mlp_vars(), X, sparsity=0.25)
    text = st.describe(r.plan)
    assert "group 0: 16 -> 12  b1 axis 0 (+2 more)" in text
    assert f"variables: {r.params_before} -> {r.params_after} scalars" in text


def test_shrunk_forward_runs_on_batch_sharded_inputs():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (2 * len(devices), 4)),
                       NamedSharding(mesh, P("data")))
    v = mlp_vars()
    small, fn = st.shrink(mlp, v, st.plan_for(mlp, v, X, sparsity=0.5))
    out = fn(small, x)
    np.testing.assert_allclose(out, mlp(st.zero_removed(v, st.plan_for(mlp, v, X, sparsity=0.5)),
                                        np.asarray(x)), **TOL)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), out.ndim) or \
        len(devices) == 1



def test_global_scope_removes_exactly_the_requested_count_even_with_ties():
    def f(v, x):
        return jnp.tanh(x @ v["a"]) @ v["b"] + jnp.tanh(x @ v["c"]) @ v["d"]
    v = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2)), "c": jnp.ones((4, 6)), "d": jnp.ones((6, 2))}
    plan = st.plan_for(f, v, X, sparsity=0.5, scope="global", importance="random",
                       min_channels=1)
    plan_tied = st.plan_for(f, v, X, sparsity=0.5, scope="global", min_channels=1,
                            importance=lambda g, leaves, grads: np.ones(g.size))
    for p in (plan, plan_tied):
        assert sum(len(e["keep"]) for e in p["groups"]) == 7
