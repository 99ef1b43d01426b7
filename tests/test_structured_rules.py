"""Coupling rules of jaxprune.structured: gathers, permutations, positions, stack/tile,
collectives and shard_map, argmax, the equivariance fallback for primitives without a
rule, random bits at the reduced shape, and the NNX call form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import Mesh, PartitionSpec as P

from jaxprune import structured as st
from jaxprune.structured import StructuredPruningError
from jaxprune.structured.rules import TRACE_RULES

TOL = dict(atol=1e-5, rtol=1e-5)
X = jax.random.normal(jax.random.key(9), (2, 4))


def mlp_vars(h=16, o=3, key=0):
    k = jax.random.split(jax.random.key(key), 3)
    return {"w1": jax.random.normal(k[0], (4, h)), "b1": jax.random.normal(k[1], (h,)),
            "w2": jax.random.normal(k[2], (h, o))}


def hidden(v, x):
    return jax.nn.relu(x @ v["w1"] + v["b1"])


def assert_shrinks_exactly(f, v, *args, sparsity=0.5, **kw):
    r = st.prune_function(f, v, *args, sparsity=sparsity, importance="random", seed=3,
                          min_channels=1, **kw)
    np.testing.assert_allclose(r.apply(r.variables, *args), f(st.zero_removed(v, r.plan), *args),
                               **TOL)
    return r


# ---------------------------------------------------------------- gather (issue 9 item 1)
class SinusoidalLM(nn.Module):
    """Token embedding plus a sinusoidal position table built before the ids are read
    (the constant is traced first, as in Flax's LM1B example)."""

    vocab: int = 11
    d: int = 8

    @nn.compact
    def __call__(self, ids):
        pos = np.arange(ids.shape[1])[:, None] / 10000 ** (np.arange(self.d)[None] / self.d)
        table = jnp.asarray(np.sin(pos), jnp.float32)  # a constvar, traced before the ids
        h = nn.Embed(self.vocab, self.d)(ids) + table[None]
        up = nn.relu(nn.Dense(12, name="up")(nn.LayerNorm()(h)))
        h = h + nn.Dense(self.d, name="down")(up)
        return nn.Dense(self.vocab, name="head")(h)


def test_embedding_gather_couples_the_output_not_node_numbers_when_ids_are_not_first():
    ids = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    v = SinusoidalLM().init(jax.random.key(0), ids)
    found = st.groups(SinusoidalLM().apply, v, ids)
    mlp = next(g for g in found if ("params/up/kernel", 1) in g.members)
    assert mlp.size == 12 and ("params/down/kernel", 0) in mlp.members
    width = next(g for g in found if ("params/Embed_0/embedding", 1) in g.members)
    assert width.size == 8 and ("params/head/kernel", 0) in width.members
    r = st.prune_channels(SinusoidalLM(), v, ids, sparsity=0.5, ignore="Embed")
    np.testing.assert_allclose(r.apply(r.variables, ids),
                               SinusoidalLM().apply(st.zero_removed(v, r.plan), ids), **TOL)


def test_gather_batch_axes_follow_the_indices_with_a_constant_traced_first():
    table = np.linspace(0, 1, 6 * 5, dtype=np.float32).reshape(6, 5)
    v = {"emb": jax.random.normal(jax.random.key(0), (10, 6)), "w": jnp.ones((6, 3))}

    def f(v, ids):
        return (v["emb"][ids] + table.sum(1)) @ v["w"]  # batch axes of ids: (2, 5)
    (g,) = st.groups(f, v, jnp.zeros((2, 5), jnp.int32))
    assert g.members == [("emb", 1), ("w", 0)] and g.size == 6
    assert_shrinks_exactly(f, v, jnp.arange(10).reshape(2, 5))


def test_take_along_axis_with_batching_dims_shrinks_exactly():
    def f(v, x):
        h = hidden(v, x)
        order = jnp.argsort(x, axis=-1)  # data-dependent positions along the input axis
        return jnp.take_along_axis(x, order, axis=-1) @ v["w1"] * h @ v["w2"]
    assert_shrinks_exactly(f, mlp_vars(), X)


# ---------------------------------------------------------------- permutations (issue 11 item 9)
def test_constant_permutation_of_a_hidden_axis_couples_through_the_permutation():
    perm = np.random.default_rng(0).permutation(16)
    f = lambda v, x: hidden(v, x)[:, perm] @ v["w2"]
    v = mlp_vars()
    (g,) = st.groups(f, v, X)
    assert g.members == [("b1", 0), ("w1", 1), ("w2", 0)]
    assert g.layouts[2] == tuple(perm)  # row i of w2 carries channel perm[i]
    r = assert_shrinks_exactly(f, v, X)
    assert r.variables["w1"].shape == (4, 8) and r.variables["w2"].shape == (8, 3)


def test_constant_gather_with_repeats_and_flip_shrink_exactly():
    idx = np.array([3, 3, 0, 15, 7, 7, 1])
    v = {**mlp_vars(), "w2": jax.random.normal(jax.random.key(1), (7, 3))}
    assert_shrinks_exactly(lambda v, x: hidden(v, x)[:, idx] @ v["w2"], v, X)
    flip = lambda v, x: jnp.flip(hidden(v, x), -1) @ v["w2"]
    (g,) = st.groups(flip, mlp_vars(), X)
    assert g.layouts[2] == tuple(range(15, -1, -1))
    assert_shrinks_exactly(flip, mlp_vars(), X)


def test_argsort_gather_and_self_permutation_never_crash_or_differ():
    f = lambda v, x: hidden(v, x)[:, jnp.argsort(v["b1"])] @ v["w2"]
    assert st.groups(f, mlp_vars(), X) == []  # positions depend on data: frozen
    perm = np.random.default_rng(1).permutation(16)
    g = lambda v, x: (hidden(v, x) + hidden(v, x)[:, perm]) @ v["w2"]
    assert st.groups(g, mlp_vars(), X) == []  # a kept set would have to be closed under perm


# ---------------------------------------------------------------- positions (issue 9 item 6)
def test_position_table_rows_beyond_the_traced_length_and_unread_leaves_are_not_groups():
    def f(v, x):  # x: (batch, seq=3, 4); the tables hold 8 positions
        h = x @ v["w1"] + v["pos"][: x.shape[1]] + v["pos2"][jnp.arange(x.shape[1])]
        return jax.nn.relu(h) @ v["w2"]
    v = {"w1": jnp.ones((4, 6)), "pos": jnp.ones((8, 6)), "pos2": jnp.ones((8, 6)),
         "w2": jnp.ones((6, 2)), "unused": jnp.ones(5)}
    x = jnp.ones((2, 3, 4))
    (g,) = st.groups(f, v, x)
    assert g.size == 6 and ("pos", 1) in g.members and ("pos2", 1) in g.members
    assert all(p != "unused" and (p, a) not in (("pos", 0), ("pos2", 0)) for p, a in g.members)


def test_channels_a_slice_drops_are_frozen_but_kept_ones_prune():
    f = lambda v, x: hidden(v, x)[:, 4:12] @ v["w2"]
    v = {**mlp_vars(), "w2": jax.random.normal(jax.random.key(2), (8, 3))}
    (g,) = st.groups(f, v, X)
    assert g.size == 8 and len(g.layouts[0]) == 16  # only the read part of b1/w1
    r = assert_shrinks_exactly(f, v, X)
    assert r.variables["w1"].shape == (4, 12)  # 8 dropped stay, 4 of the 8 read ones go


# ---------------------------------------------------------------- argmax (issue 11 item 7)
def test_argmax_over_a_hidden_axis_freezes_it():
    def f(v, x):
        h = hidden(v, x)
        return h @ v["w2"] + jnp.argmax(h, -1)[:, None] + jnp.argmin(h, -1)[:, None]
    assert st.groups(f, mlp_vars(), X) == []
    g = lambda v, x: hidden(v, x) @ v["w2"] + jnp.argmax(x, -1)[:, None]  # not the hidden axis
    assert len(st.groups(g, mlp_vars(), X)) == 1


# ---------------------------------------------------------------- stack, unstack, tile
def test_stack_unstack_and_tile_shrink_exactly():
    def f(v, x):
        h = hidden(v, x)
        s = jnp.stack([h, 2 * h], axis=1)  # (b, 2, 16)
        a, b = jnp.unstack(s, axis=1)
        t = jnp.tile(a + b, (1, 2)) * v["g"]  # (b, 32) = 2 repetitions x 16 channels
        return t @ v["w3"]
    v = {**mlp_vars(), "g": jnp.linspace(0.5, 1.5, 32), "w3": jax.random.normal(jax.random.key(3), (32, 2))}
    (g,) = st.groups(f, v, X)
    assert ("w3", 0) in g.members and len(g.layouts[g.members.index(("w3", 0))]) == 32
    r = assert_shrinks_exactly(f, v, X)
    assert r.variables["w3"].shape == (16, 2)


# ---------------------------------------------------------------- collectives and shard_map
class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.5)(h)
        return nn.Dense(3)(nn.relu(h).mean((0, 1)))


def _perturbed(v):
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.slow
def test_batchnorm_with_axis_name_in_train_mode_under_vmap_and_pmap():
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    v = _perturbed(ConvBN().init(jax.random.key(0), x[0]))
    per_example = lambda v, x: ConvBN().apply(v, x, mutable=["batch_stats"])
    axes = dict(in_axes=(None, 0), out_axes=(0, None), axis_name="batch")  # stats: one copy
    vm = lambda v, x: jax.vmap(per_example, **axes)(v, x)
    pm = lambda v, x: jax.pmap(per_example, **axes)(v, x)
    for fn in (vm, pm):
        found = st.groups(fn, v, x)
        assert [g.size for g in found] == [8]
        r = st.prune_function(fn, v, x, sparsity=0.5, importance="random")
        (out, stats), (ref, ref_stats) = r.apply(r.variables, x), fn(st.zero_removed(v, r.plan), x)
        np.testing.assert_allclose(out, ref, **TOL)
        keep = np.asarray(r.plan["groups"][0]["keep"])
        np.testing.assert_allclose(stats["batch_stats"]["BatchNorm_0"]["mean"],
                                   ref_stats["batch_stats"]["BatchNorm_0"]["mean"][..., keep], **TOL)


def test_shard_map_body_with_collectives_shrinks_exactly():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    n = len(jax.devices())

    def body(v, x):
        h = hidden(v, x)
        h = h - jax.lax.pmean(h, "d") + jax.lax.pmax(h, "d")
        h = h + jax.lax.ppermute(h, "d", [(i, (i + 1) % n) for i in range(n)])
        g = jax.lax.all_gather(h, "d", axis=0, tiled=True).sum(0)
        g = g + jax.lax.psum_scatter(jnp.broadcast_to(h, (n,) + h.shape), "d", scatter_dimension=0)
        return (h + g + jax.lax.axis_index("d")) @ v["w2"]

    f = lambda v, x: jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))(v, x)
    x = jax.random.normal(jax.random.key(4), (2 * n, 4))
    (g,) = st.groups(f, mlp_vars(), x)
    assert g.members == [("b1", 0), ("w1", 1), ("w2", 0)]
    assert_shrinks_exactly(f, mlp_vars(), x)


def test_axis_sharded_by_shard_map_is_frozen():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    n = len(jax.devices())
    body = lambda v, x: jax.lax.psum(hidden(v, x), "d") @ v["w2"]
    f = lambda v, x: jax.shard_map(body, mesh=mesh, in_specs=({"w1": P(None, "d"), "b1": P("d"),
                                                              "w2": P("d")}, P()),
                                   out_specs=P(), check_vma=False)(v, x)
    assert st.groups(f, mlp_vars(h=2 * n), X) == []


# ---------------------------------------------------------------- equivariance fallback
def _primitive(name, impl):
    """A primitive with no coupling rule (as a new jax release could add)."""
    p = Primitive(name)
    p.def_impl(impl)
    p.def_abstract_eval(lambda *avals: jax.core.ShapedArray(
        *(lambda s: (s.shape, s.dtype))(jax.eval_shape(impl, *avals))))
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=False))
    return p


_scaled_tanh = _primitive("jaxprune_test_scaled_tanh", lambda x: 2 * jnp.tanh(x))
_gain = _primitive("jaxprune_test_gain", lambda x, g: x * g)
_cumsum = _primitive("jaxprune_test_cumsum", lambda x: jnp.cumsum(x, -1))
_cumsum_rows = _primitive("jaxprune_test_cumsum_rows", lambda x: jnp.cumsum(x, 0))
_sort = _primitive("jaxprune_test_sort", lambda x: jnp.sort(x, -1))
_argmax = _primitive("jaxprune_test_argmax", lambda x: jnp.argmax(x, -1))
_reverse = _primitive("jaxprune_test_reverse", lambda x: x[..., ::-1])
_PERM = np.random.default_rng(5).permutation(16)
_permute = _primitive("jaxprune_test_permute", lambda x: x[..., _PERM])
_center = _primitive("jaxprune_test_center", lambda x: x - x.mean(-1, keepdims=True))
_first = _primitive("jaxprune_test_minus_first", lambda x: x - x[..., :1])


def test_fallback_accepts_an_equivariant_primitive_and_shrinks_exactly():
    f = lambda v, x: _gain.bind(_scaled_tanh.bind(x @ v["w1"] + v["b1"]), v["g"]) @ v["w2"]
    v = {**mlp_vars(), "g": jnp.linspace(0.5, 2.0, 16)}
    (g,) = st.groups(f, v, X)
    assert g.members == [("b1", 0), ("g", 0), ("w1", 1), ("w2", 0)]
    assert_shrinks_exactly(f, v, X)


@pytest.mark.parametrize("op", [_cumsum, _sort, _argmax, _reverse, _permute, _center, _first],
                         ids=lambda p: p.name)
def test_fallback_refuses_a_primitive_that_does_not_commute_with_slicing(op):
    if op is _argmax:  # positions along the hidden axis
        f = lambda v, x: hidden(v, x) @ v["w2"] + op.bind(hidden(v, x))[:, None]
    else:
        f = lambda v, x: op.bind(hidden(v, x)) @ v["w2"]
    with pytest.raises(StructuredPruningError,
                       match=rf"unsupported primitive '{op.name}' in equation `.*{op.name}.*`.*commute"):
        st.groups(f, mlp_vars(), X)


def test_fallback_couples_the_commuting_axis_of_a_partly_mixing_primitive():
    # cumsum over the batch axis mixes examples but not channels
    f = lambda v, x: _cumsum_rows.bind(hidden(v, x)) @ v["w2"]
    (g,) = st.groups(f, mlp_vars(), X)
    assert g.size == 16
    assert_shrinks_exactly(f, mlp_vars(), X)


def test_fallback_reproduces_builtin_rules_or_refuses(monkeypatch):
    def f(v, x):
        h = jnp.tanh(x @ v["w1"] + v["b1"])
        return jnp.stack([h, h * 2], 0).sum(0) @ v["w2"]
    want = st.groups(f, mlp_vars(), X)
    for name in ("tanh", "add", "stack", "mul"):
        monkeypatch.delitem(TRACE_RULES, name)
    assert st.groups(f, mlp_vars(), X) == want
    monkeypatch.delitem(TRACE_RULES, "transpose")  # not axis-aligned: refused, never guessed
    with pytest.raises(StructuredPruningError, match="'transpose'"):
        st.groups(lambda v, x: (hidden(v, x).T * 2).T @ v["w2"], mlp_vars(), X)


def test_searchsorted_couples_its_queries_but_not_the_sorted_table():
    # jax 0.10: a scan over comparisons; jax 0.12: one "hijax" primitive (call_hi_primitive)
    edges = np.linspace(-1, 1, 7).astype(np.float32)
    f = lambda v, x: (jnp.searchsorted(edges, hidden(v, x)) * hidden(v, x)) @ v["w2"]
    (g,) = st.groups(f, mlp_vars(), X)
    assert g.size == 16
    assert_shrinks_exactly(f, mlp_vars(), X)
    table = lambda v, x: jnp.searchsorted(jnp.sort(hidden(v, x)[0]), x[0])[None].astype(jnp.float32) \
        @ v["w2"][:4] + hidden(v, x) @ v["w2"]
    assert st.groups(table, mlp_vars(), X) == []


# ---------------------------------------------------------------- random bits (issue 9 item 5)
class DropMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(16)(x)))
        return nn.Dense(3)(h)


def _bits_shapes(fn, *args):
    shapes = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "random_bits":
                shapes.append(tuple(e.outvars[0].aval.shape))
            for p in e.params.values():
                for q in p if isinstance(p, (tuple, list)) else [p]:
                    if hasattr(q, "eqns") or type(q).__name__ == "ClosedJaxpr":
                        walk(q.jaxpr if hasattr(q, "jaxpr") else q)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def test_dropout_bits_are_drawn_at_the_reduced_shape_unless_exact():
    x = jax.random.normal(jax.random.key(2), (64, 4))
    v = DropMLP().init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    fn = lambda v, x, key: DropMLP().apply(v, x, rngs={"dropout": key})
    key = jax.random.key(5)
    exact = st.prune_channels(fn, v, x, key, sparsity=0.5, random_bits="exact")
    np.testing.assert_allclose(exact.apply(exact.variables, x, key),
                               fn(st.zero_removed(v, exact.plan), x, key), **TOL)
    assert _bits_shapes(exact.apply, exact.variables, x, key) == [(64, 16)]
    r = st.prune_channels(fn, v, x, key, sparsity=0.5)  # the default draws 8 columns, not 16
    assert _bits_shapes(r.apply, r.variables, x, key) == [(64, 8)]
    with pytest.raises(ValueError, match="random_bits"):
        st.prune_channels(fn, v, x, key, sparsity=0.5, random_bits="full")


def test_reduced_dropout_bits_keep_values_and_drop_rate():
    def f(v, x, key):  # the dropped hidden units themselves are the output
        h = hidden(v, x) + 1.0  # never 0 unless dropped
        return jnp.where(jax.random.bernoulli(key, 0.5, h.shape), h, 0.0)
    v, x = mlp_vars(), jax.random.normal(jax.random.key(2), (64, 4))
    r = st.prune_function(f, v, x, jax.random.key(0), sparsity=0.5, prunable_io=True,
                          ignore=lambda g: g.size == 4)
    keep = st.kept_positions(r.plan)[("w1", 1)]
    want = np.asarray(hidden(st.zero_removed(v, r.plan), x) + 1.0)[:, keep]
    outs = np.stack([np.asarray(r.apply(r.variables, x, jax.random.key(s))) for s in range(8)])
    assert outs.shape == (8, 64, 8)
    kept_entries = outs != 0
    np.testing.assert_allclose(outs, np.where(kept_entries, want[None], 0.0), **TOL)
    assert abs(kept_entries.mean() - 0.5) < 0.05  # 4096 Bernoulli(0.5) draws
    assert 0.3 < kept_entries.mean((0, 1)).min() and kept_entries.mean((0, 1)).max() < 0.7


# ---------------------------------------------------------------- NNX call form (issue 10 item 4)
class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 16, rngs=rngs)
        self.b = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def test_nnx_model_given_its_state_the_linen_way_says_how_to_call_it():
    model = NNXMLP(nnx.Rngs(0))
    for state in (nnx.state(model), nnx.to_pure_dict(nnx.state(model))):
        with pytest.raises(TypeError, match=r"for an NNX module pass only the inputs: "
                                            r"prune_channels\(model, x, ...\)"):
            st.prune_channels(model, state, X, sparsity=0.5)
    r = st.prune_channels(model, X, sparsity=0.5)
    assert r.model(X).shape == (2, 3)
