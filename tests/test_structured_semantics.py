"""What a shrunk model computes over a pruned axis (masked / native), factored
axes under ``sparsity``, and the global-selection guard."""

from __future__ import annotations

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo_linen
from jaxprune import structured as st
from jaxprune.structured import flax as fx
from jaxprune.structured.native import Misaligned

X = jax.random.normal(jax.random.key(1), (3, 5))
SEQ = jax.random.normal(jax.random.key(2), (2, 4, 7))
IMG = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))


def close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert float(np.abs(got - want).max()) <= 1e-5 * max(1.0, float(np.abs(want).max()))


def noisy(tree, seed=0):
    """Every leaf moved (norm scales and biases included), so equality means something."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.5, np.shape(x)), x.dtype), tree)


# ---------------------------------------------------------------- models with every spelling
class Spellings(nn.Module):
    """mean with and without keepdims, var, std (ddof=1), max, softmax over a pruned axis."""
    w: int = 12
    h: int = 10

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.w)(x)
        h = h - jnp.mean(h, -1, keepdims=True)
        h = h / jnp.sqrt(jnp.var(h, -1, keepdims=True) + 1.0) + jnp.std(h, -1, ddof=1)[..., None]
        h = h * jnp.mean(h, -1)[..., None] + jnp.max(h, -1, keepdims=True)
        h = jax.nn.softmax(nn.Dense(self.h)(nn.gelu(h)), axis=-1)
        return nn.Dense(3)(h)


class Norms(nn.Module):
    """nn.LayerNorm, nn.RMSNorm and nn.GroupNorm over pruned widths."""
    w: int = 12
    c: int = 20
    groups: int = 5

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(nn.Dense(self.w)(x))
        h = nn.RMSNorm()(nn.Dense(self.w)(nn.relu(h)) + h)
        h = nn.GroupNorm(num_groups=self.groups)(nn.Dense(self.c)(h))
        return nn.Dense(3)(nn.silu(h))


class StdConvNet(nn.Module):
    """Weight-standardised convolutions (BiT) and GroupNorm over channels."""
    c: int = 12
    groups: int = 3
    c2: int = 10

    @nn.compact
    def __call__(self, x):
        h = zoo_linen.StdConv(self.c, (3, 3))(x)
        h = nn.relu(nn.GroupNorm(num_groups=self.groups)(h))
        h = zoo_linen.StdConv(self.c2, (3, 3))(h)
        return nn.Dense(3)(h.mean((1, 2)))


class Attention(nn.Module):
    """Pre-LN attention: heads and head_dim pruned (scale 1/sqrt(head_dim))."""
    d: int = 12
    heads: int = 3
    head_dim: int = 6

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.d)(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                            qkv_features=self.heads * self.head_dim)(nn.LayerNorm()(x))
        return nn.Dense(3)(nn.LayerNorm()(x + h))


def reduced(model, plan, small):
    """The same class built at the widths of the pruned variables (the native reference)."""
    p = small["params"]
    kept = {e["size"]: len(e["keep"]) for e in plan["groups"]}
    if isinstance(model, Spellings):
        return Spellings(p["Dense_0"]["kernel"].shape[1], p["Dense_1"]["kernel"].shape[1])
    if isinstance(model, Norms):
        return Norms(p["Dense_0"]["kernel"].shape[1], p["Dense_2"]["kernel"].shape[1], kept[5])
    if isinstance(model, StdConvNet):
        return StdConvNet(p["StdConv_0"]["kernel"].shape[-1], kept[3],
                          p["StdConv_1"]["kernel"].shape[-1])
    heads, hd = p["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape[1:]
    return Attention(p["Dense_0"]["kernel"].shape[1], heads, hd)


LINEN = [(Spellings(), X), (Norms(), X), (StdConvNet(), IMG), (Attention(), SEQ)]
IDS = ["spellings", "norms", "stdconv", "attention"]


@pytest.fixture(scope="module")
def linen_results():
    out = {}
    for (m, x), name in zip(LINEN, IDS):
        v = noisy(m.init(jax.random.key(0), x))
        out[name] = (m, v, x, st.prune_channels(m, v, x, sparsity=0.5),
                     st.prune_channels(m, v, x, sparsity=0.5, semantics="native"))
    return out


@pytest.mark.parametrize("name", IDS)
def test_masked_semantics_is_the_zero_removed_model_for_every_spelling(linen_results, name):
    m, v, x, r, _ = linen_results[name]
    assert r.plan["semantics"] == "masked"
    assert min(len(e["keep"]) / e["size"] for e in r.plan["groups"]) < 1
    close(r.apply(r.variables, x), m.apply(st.zero_removed(v, r.plan), x))
    close(r.module.apply(r.variables, x), r.apply(r.variables, x))


@pytest.mark.parametrize("name", IDS)
def test_native_semantics_is_the_class_built_at_the_reduced_widths(linen_results, name):
    m, v, x, _, r = linen_results[name]
    assert r.plan["semantics"] == "native"
    want = reduced(m, r.plan, r.variables).apply(r.variables, x)
    close(r.apply(r.variables, x), want)
    # ... and genuinely differs from the masked model (the test could fail).
    assert np.abs(np.asarray(want) - np.asarray(m.apply(st.zero_removed(v, r.plan), x))).max() > 1e-3


def test_group_norm_groups_and_widths_in_the_native_reference():
    r = st.prune_channels(Norms(), noisy(Norms().init(jax.random.key(0), X)), X, sparsity=0.4,
                          semantics="native")
    sizes = [(e["size"], len(e["keep"])) for e in r.plan["groups"]]
    assert sizes[1:] == [(5, 3), (4, 4)]  # whole norm groups go; channels per group stay


# ---------------------------------------------------------------- NNX: masked, native, rebuild
class NnxNorms(nnx.Module):
    def __init__(self, w, c, groups, heads, hd, rngs):
        self.inp = nnx.Linear(7, w, rngs=rngs)
        self.ln = nnx.LayerNorm(w, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, w, heads * hd, decode=False, rngs=rngs)
        self.rms = nnx.RMSNorm(w, rngs=rngs)
        self.up = nnx.Linear(w, c, rngs=rngs)
        self.gn = nnx.GroupNorm(c, num_groups=groups, rngs=rngs)
        self.out = nnx.Linear(c, 3, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        x = x + self.attn(self.ln(x))
        return self.out(nnx.silu(self.gn(self.up(self.rms(x)))))


def _nnx():
    m = NnxNorms(12, 20, 5, 3, 6, nnx.Rngs(0))
    state = nnx.state(m)
    nnx.replace_by_pure_dict(state, noisy(nnx.to_pure_dict(state)))
    nnx.update(m, state)
    return m


def _rebuild(v, groups=None):
    heads, hd = v["attn"]["query"]["kernel"].shape[1:]
    w, c = v["inp"]["kernel"].shape[1], v["up"]["kernel"].shape[1]
    return NnxNorms(w, c, groups or c // 4, heads, hd, nnx.Rngs(1))


def test_nnx_masked_native_and_rebuilt_models_each_match_their_reference():
    m = _nnx()
    fn, pure, _ = fx.nnx_functional(m)
    masked = st.prune_channels(m, SEQ, sparsity=0.5)
    close(masked.apply(masked.variables, SEQ), fn(st.zero_removed(pure, masked.plan), SEQ)[0])
    close(masked.model(SEQ), masked.apply(masked.variables, SEQ))
    native = st.prune_channels(m, SEQ, sparsity=0.5, semantics="native")
    ref = fx.rebuild_nnx(lambda: _rebuild(native.variables), native.variables)
    close(native.apply(native.variables, SEQ), ref(SEQ))
    rebuilt = st.prune_channels(m, SEQ, sparsity=0.5, rebuild=_rebuild)
    assert type(rebuilt.model) is NnxNorms and rebuilt.plan["semantics"] == "native"
    close(rebuilt.model(SEQ), rebuilt.apply(rebuilt.variables, SEQ))
    close(rebuilt.apply(rebuilt.variables, SEQ), native.apply(native.variables, SEQ))


def test_a_rebuild_that_prunes_differently_is_refused_naming_the_equation():
    m = _nnx()
    # GroupNorm keeps num_groups=5 at 12 channels instead of the plan's 3 groups of 4.
    with pytest.raises(Misaligned, match=r"reshape|shape"):
        st.prune_channels(m, SEQ, sparsity=0.5, rebuild=lambda v: _rebuild(v, groups=4))


def test_rebuild_means_native_semantics():
    m = _nnx()
    with pytest.raises(ValueError, match="native"):
        st.prune_channels(m, SEQ, sparsity=0.5, rebuild=_rebuild, semantics="masked")


# ---------------------------------------------------------------- native: refuse when it cannot tell
def test_native_refuses_constants_it_cannot_tell_from_a_width():
    w = {"a": jnp.ones((5, 8)), "b": jnp.ones((8, 3))}
    scaled = lambda v, x: (jnp.tanh(x @ v["a"]) * jnp.sqrt(8.0)) @ v["b"]  # Gemma's sqrt(d)
    small, fn = st.shrink(scaled, w, st.plan_for(scaled, w, X, semantics="native"),
                          reference=False)
    with pytest.raises(st.StructuredPruningError, match=r"constant 2\.8284.*mul"):
        fn(small, X)
    table = np.sin(np.arange(8.0))  # a constant table along the pruned axis
    tabled = lambda v, x: jnp.tanh(x @ v["a"] + table) @ v["b"]
    plan = st.plan_for(tabled, w, X, semantics="native")
    small, fn = st.shrink(tabled, w, plan, reference=False)
    with pytest.raises(st.StructuredPruningError, match="constant array"):
        fn(small, X)
    iota = lambda v, x: jnp.tanh(x @ v["a"] * jnp.arange(8.0)) @ v["b"]
    small, fn = st.shrink(iota, w, st.plan_for(iota, w, X, semantics="native"), reference=False)
    with pytest.raises(st.StructuredPruningError, match="iota"):
        fn(small, X)
    # The masked semantics carries all three exactly.
    for f in (scaled, tabled, iota):
        plan = st.plan_for(f, noisy(w), X)
        small, fn = st.shrink(f, noisy(w), plan)
        close(fn(small, X), f(st.zero_removed(noisy(w), plan), X))


def test_native_plain_function_is_traced_again_at_the_reduced_widths():
    def f(v, x):  # a table computed from the width: only a second trace knows it
        d = v["a"].shape[1]
        pe = jnp.asarray(np.sin(np.arange(d) / d))
        return nn.LayerNorm().apply({"params": {"scale": v["s"], "bias": v["c"]}}, x @ v["a"] + pe) @ v["b"]
    w = noisy({"a": jnp.ones((5, 8)), "b": jnp.ones((8, 3)), "s": jnp.ones(8), "c": jnp.zeros(8)})
    r = st.prune_channels(f, w, X, sparsity=0.5, semantics="native")
    close(r.apply(r.variables, X), f(r.variables, X))


# ---------------------------------------------------------------- masked: refuse what it cannot carry
def test_argmax_over_a_channel_axis_never_returns_positions_among_kept_channels():
    w = noisy({"a": jnp.ones((5, 8)), "b": jnp.ones((8, 3)), "c": jnp.ones((5, 6)),
               "d": jnp.ones((6, 3))})
    f = lambda v, x: (jnp.tanh(x @ v["a"]) @ v["b"]) * jnp.argmax(x @ v["a"], -1)[:, None] \
        + jnp.tanh(x @ v["c"]) @ v["d"]
    r = st.prune_function(f, w, X, sparsity=0.5)
    assert [g.members[0] for g in r.groups] == [("c", 1)]  # the argmax axis stays whole
    close(r.apply(r.variables, X), f(st.zero_removed(w, r.plan), X))


def test_masked_refuses_random_values_that_reach_a_sum_over_removed_channels():
    w = {"a": jnp.ones((5, 8)), "b": jnp.ones((8, 3))}

    def f(v, x, key):
        h = jnp.exp(x @ v["a"])  # removed channels hold exp(0) = 1
        keep = jax.random.bernoulli(key, 0.5, h.shape)
        h = jnp.where(keep, h, 0.0)
        return (h / h.sum(-1, keepdims=True)) @ v["b"]
    key = jax.random.key(0)
    small, fn = st.shrink(f, w, st.plan_for(f, w, X, key))
    with pytest.raises(st.StructuredPruningError, match="reduce_sum"):
        fn(small, X, key)


# ---------------------------------------------------------------- plans record their semantics
def test_plan_records_its_semantics_and_shrink_replays_it():
    m, x = Norms(), X
    v = noisy(m.init(jax.random.key(0), x))
    plan = json.loads(json.dumps(st.plan_for(m.apply, v, x, semantics="native")))
    assert plan["semantics"] == "native" and "semantics: native" in st.describe(plan)
    small, fn = st.shrink(m.apply, v, plan)
    close(fn(small, x), reduced(m, plan, small).apply(small, x))
    small, fn = st.shrink(m.apply, v, plan, semantics="masked")  # an explicit choice wins
    close(fn(small, x), m.apply(st.zero_removed(v, plan), x))
    with pytest.raises(ValueError, match="semantics"):
        st.shrink(m.apply, v, plan, semantics="dense")


# ---------------------------------------------------------------- factored axes under sparsity
class GQA(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, s, _ = x.shape
        q = nn.Dense(4 * 6)(x).reshape(b, s, 2, 2, 6)  # 4 query heads = 2 kv heads x 2
        k = nn.Dense(2 * 6)(x).reshape(b, s, 2, 6)
        v = nn.Dense(2 * 6)(x).reshape(b, s, 2, 6)
        w = jax.nn.softmax(jnp.einsum("bsgrd,btgd->bgrst", q, k) / np.sqrt(6), -1)
        return nn.Dense(7)(jnp.einsum("bgrst,btgd->bsgrd", w, v).reshape(b, s, -1))


def test_half_the_query_heads_go_as_whole_kv_groups_at_sparsity_one_half():
    v = GQA().init(jax.random.key(0), SEQ)
    r = st.prune_channels(GQA(), v, SEQ, sparsity=0.5)
    p = r.variables["params"]
    assert p["Dense_0"]["kernel"].shape == (7, 12)  # 2 of 4 query heads, head_dim 6
    assert p["Dense_1"]["kernel"].shape == (7, 6)   # 1 of 2 kv heads
    text = st.describe(r.plan)
    assert "params/Dense_0/kernel axis 1: 24 -> 12 (-50%)" in text
    assert "params/Dense_1/kernel axis 1: 12 -> 6 (-50%)" in text
    close(r.apply(r.variables, SEQ), GQA().apply(st.zero_removed(v, r.plan), SEQ))


def test_hybrid_resnet_vit_loses_about_half_of_each_prunable_dimension():
    m = zoo_linen.ViT(resnet=True, classifier="gap")
    img = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
    v = jax.eval_shape(lambda k: m.init(k, img), jax.random.key(0))
    gs = st.groups(m.apply, v, img)
    kept = st.select_channels(gs, [np.arange(g.size, dtype=float) for g in gs], 0.5)
    plan = st.make_plan(v, gs, kept)
    for (path, axis), idx in st.kept_positions(plan).items():
        n = plan["leaves"][path][axis]
        assert 0.4 <= 1 - len(idx) / n <= 0.6, (path, axis, n, len(idx))
    before = st.param_count(v)
    after = st.param_count(jax.eval_shape(lambda v: st.slice_variables(v, plan), v))
    assert 0.2 < after / before < 0.5  # matrices lose 3/4, vectors 1/2; not 88% of all


# ---------------------------------------------------------------- global selection guard
class Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        h = nn.Dense(8)(nn.relu(nn.Dense(12)(nn.LayerNorm()(x))))
        return nn.Dense(3)(x + h)


def test_global_selection_keeps_a_channel_of_every_group_and_says_so():
    m = Residual()
    v = m.init(jax.random.key(0), X)
    gs = st.groups(m.apply, v, X)
    scores = [np.full(g.size, 10.0) if g.size == 8 else np.arange(12) * 1e-3 for g in gs]
    with pytest.warns(UserWarning, match="every channel of 1 group"):
        kept = st.select_channels(gs, scores, 0.6, scope="global")
    assert sorted(len(k) for k in kept) == [1, 7]  # 12 removed: 11 hidden + 1 residual
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guard needed: no warning
        st.select_channels(gs, scores, 0.3, scope="global")
    kept = st.select_channels(gs, scores, 0.6, scope="global", min_channels=0)
    assert sorted(len(k) for k in kept) == [0, 8]
    # A whole residual branch removed: zero-width layers, still the masked model.
    plan = st.make_plan(v, gs, kept)
    small, fn = st.shrink(m.apply, v, plan)
    assert small["params"]["Dense_2"]["kernel"].shape == (8, 0)
    close(fn(small, X), m.apply(st.zero_removed(v, plan), X))


class NnxEvalNet(nnx.Module):
    def __init__(self, w, rngs):
        self.inp = nnx.Linear(7, w, rngs=rngs)
        self.bn = nnx.BatchNorm(w, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(w, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.inp(x)))))


def test_a_rebuilt_nnx_model_keeps_the_eval_mode_of_the_model_it_replaces():
    m = NnxEvalNet(12, nnx.Rngs(0))
    state = nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, noisy(nnx.to_pure_dict(state)))  # running stats too
    nnx.update(m, state)
    m.eval()
    x = SEQ[0]
    r = st.prune_channels(m, x, sparsity=0.5,
                          rebuild=lambda v: NnxEvalNet(v["inp"]["kernel"].shape[1], nnx.Rngs(1)))
    assert r.model.drop.deterministic and r.model.bn.use_running_average  # was: training mode
    close(r.model(x), r.apply(r.variables, x))
    close(r.model(x), r.model(x))  # no dropout noise
