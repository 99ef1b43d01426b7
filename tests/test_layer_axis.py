"""Stacked (scanned) layers: ``layer_axis`` prunes every layer slice exactly as
if the layers were separate leaves. Each test compares a scanned Flax model
(Linen ``nn.scan``, NNX ``nnx.vmap``) with its unrolled twin holding the same
weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxprune
from jaxprune import masks as M

L, D, H = 3, 8, 16


class Block(nn.Module):
    """A small pre-LN transformer block: self-attention (q/k/v/o) and an MLP.
    Only the kernels carry partitioning metadata (as with Flax's defaults):
    under ``nn.scan`` the biases and the LayerNorm's scale and bias become
    2-D leaves that ``scan_axes`` does not name."""

    @nn.compact
    def __call__(self, x, _=None):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        dense = lambda n, name: nn.Dense(n, kernel_init=init, name=name)
        x = nn.LayerNorm(name="ln")(x)
        q, k, v = dense(D, "q")(x), dense(D, "k")(x), dense(D, "v")(x)
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / D ** 0.5, axis=-1)
        x = x + dense(D, "o")(att @ v)
        x = x + dense(D, "down")(nn.gelu(dense(H, "up")(x)))
        return x, None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=L, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(name="layers")(x)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for j in range(L):
            x = Block(name=f"layers_{j}")(x)[0]
        return x


@pytest.fixture(scope="module")
def linen_twins():
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    variables = Scanned().init(jax.random.key(0), x)
    axes = jaxprune.tree.scan_axes(variables)
    scanned = nn.unbox(variables)
    # A layer with tiny weights: global magnitude pruning would empty it.
    scanned = jax.tree_util.tree_map_with_path(
        lambda p, w: w.at[1].multiply(1e-3) if jaxprune.tree.path_str(p).endswith("up/kernel")
        else w, scanned)
    unrolled = {"params": {f"layers_{j}": jax.tree.map(lambda w: w[j], scanned["params"]["layers"])
                           for j in range(L)}}
    np.testing.assert_allclose(Scanned().apply(scanned, x), Unrolled().apply(unrolled, x),
                               rtol=1e-5, atol=1e-5)
    return scanned, unrolled, axes


def _assert_same_per_layer(scanned_masks, unrolled_masks, axis=0):
    """Layer ``j`` of every stacked mask equals the unrolled twin's mask."""
    stacked = scanned_masks["params"]["layers"]
    for j in range(L):
        twin = unrolled_masks["params"][f"layers_{j}"]
        got = jax.tree.map(lambda m: None if m is None else np.take(np.asarray(m), j, axis),
                           stacked, is_leaf=lambda x: x is None)
        flat_got = jax.tree.leaves(got, is_leaf=lambda x: x is None)
        flat_twin = jax.tree.leaves(twin, is_leaf=lambda x: x is None)
        assert len(flat_got) == len(flat_twin)
        for a, b in zip(flat_got, flat_twin):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, np.asarray(b))


def test_scan_axes_reads_the_layer_axis_from_linen_and_nnx_metadata(linen_twins):
    _, _, axes = linen_twins
    kernels = {f"params/layers/{n}/kernel": 0 for n in ("q", "k", "v", "o", "up", "down")}
    assert axes == kernels  # biases carry no partitioning metadata
    assert jaxprune.tree.scan_axes({"w": jnp.ones((2, 2))}) == {}


@pytest.mark.parametrize("kw", [dict(scope="local"), dict(scope="local", distribution="erk"),
                                dict(scope="global"), dict(scope="global", min_density=0.05)])
def test_scanned_linen_transformer_gets_the_masks_of_its_unrolled_twin(linen_twins, kw):
    scanned, unrolled, axes = linen_twins
    got = M.unstructured(jaxprune.scores.magnitude(scanned), 0.75, where="kernel", layer_axis=axes, **kw)
    want = M.unstructured(jaxprune.scores.magnitude(unrolled), 0.75, where="kernel", **kw)
    _assert_same_per_layer(got, want)


@pytest.mark.parametrize("how", ["unstructured", "n_of_m", "prune", "rigl", "prune_round"])
def test_default_where_selects_what_the_unrolled_twin_selects(linen_twins, how):
    # No where=: the default must not pick the scanned biases and LayerNorm
    # scales (2-D once stacked) that the unrolled twin leaves dense.
    scanned, unrolled, axes = linen_twins
    if how == "unstructured":
        run = lambda p, **kw: M.unstructured(jaxprune.scores.magnitude(p), 0.75, **kw)
    elif how == "n_of_m":
        run = lambda p, **kw: M.n_of_m(jaxprune.scores.magnitude(p), 2, 4, **kw)
    elif how == "prune":
        def run(p, **kw):
            tx = optax.chain(optax.sgd(0.0), jaxprune.prune(sparsity=0.75, **kw))
            return jaxprune.masks_of(jax.jit(lambda q: tx.update(q, tx.init(q), q)[1])(p))
    elif how == "rigl":
        run = lambda p, **kw: jaxprune.masks_of(jaxprune.rigl(
            optax.sgd(0.1), 0.75, end=10, distribution="uniform", **kw).init(p))
    else:
        run = lambda p, **kw: jaxprune.lottery.prune_round(p, None, 0.5, scope="local", **kw)
    got, want = run(scanned, layer_axis=axes), run(unrolled)
    masked = [jaxprune.tree.path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(
        got, is_leaf=lambda x: x is None)[0] if m is not None]
    assert masked == [f"params/layers/{n}/kernel" for n in ("down", "k", "o", "q", "up", "v")]
    if how != "rigl":  # rigl draws random masks: same leaves, per-layer counts checked below
        _assert_same_per_layer(got, want)
    else:
        want_counts = {n: [int(np.asarray(want["params"][f"layers_{j}"][n]["kernel"]).sum())
                           for j in range(L)] for n in ("down", "k", "o", "q", "up", "v")}
        assert _active_per_layer(got) == {f"{n}/kernel": c for n, c in want_counts.items()}


def test_global_guard_holds_the_tiny_layer_slice_like_the_unrolled_twin(linen_twins):
    scanned, unrolled, axes = linen_twins
    got = M.unstructured(jaxprune.scores.magnitude(scanned), 0.9, scope="global", where="kernel",
                         layer_axis=axes)
    up = np.asarray(got["params"]["layers"]["up"]["kernel"])
    # Without the per-layer guard the scaled layer 1 would lose every weight.
    assert up[1].sum() >= np.ceil((up[1].size - jaxprune.threshold.prune_count(0.9, up[1].size))
                                  / M.GUARD_SHARE)


@pytest.mark.parametrize("kw", [dict(), dict(min_density=0.05)])
def test_jitted_global_guard_on_layer_rows_matches_the_unrolled_twin(linen_twins, kw):
    # Under jit the guard runs on the stacks' layer rows (no per-layer slices).
    scanned, unrolled, axes = linen_twins
    got = jax.jit(lambda s: M.unstructured(s, 0.9, scope="global", layer_axis=axes, **kw))(
        jaxprune.scores.magnitude(scanned))
    want = M.unstructured(jaxprune.scores.magnitude(unrolled), 0.9, scope="global", **kw)
    _assert_same_per_layer(got, want)
    up = np.asarray(got["params"]["layers"]["up"]["kernel"])
    assert up[1].sum() >= np.ceil(0.05 * up[1].size) if kw else up[1].sum() > 0  # held


def test_local_layer_axis_counts_each_slice_and_any_axis_position():
    w = jax.random.normal(jax.random.key(0), (6, 4, 5))
    for axis in (0, 1, -1):
        m = np.asarray(M.unstructured({"w": jnp.abs(w)}, 0.75, layer_axis=axis)["w"])
        moved = np.moveaxis(m, axis, 0)
        for j, layer in enumerate(moved):
            alone = M.unstructured({"w": jnp.abs(np.moveaxis(np.asarray(w), axis, 0)[j])},
                                   0.75)["w"]
            np.testing.assert_array_equal(layer, np.asarray(alone))
    # One allocation over the stack would not give each layer its exact share.
    mixed = np.asarray(M.unstructured({"w": jnp.abs(w).at[0].multiply(10.0)}, 0.75)["w"])
    assert mixed[0].sum() != mixed[1].sum()


def test_n_of_m_default_axis_is_each_slices_reduction_axis(linen_twins):
    scanned, unrolled, axes = linen_twins
    got = M.n_of_m(jaxprune.scores.magnitude(scanned), 2, 4, where="kernel", layer_axis=axes)
    want = M.n_of_m(jaxprune.scores.magnitude(unrolled), 2, 4, where="kernel")
    _assert_same_per_layer(got, want)


@pytest.mark.parametrize("which,scope", [("prune", "local"), ("pruned", "global")])
def test_prune_and_pruned_with_layer_axis_match_the_unrolled_twin(linen_twins, which, scope):
    scanned, unrolled, axes = linen_twins
    make = {"prune": lambda **kw: optax.chain(optax.sgd(0.0), jaxprune.prune(**kw)),
            "pruned": lambda **kw: jaxprune.pruned(optax.sgd(0.0), **kw)}[which]
    got = make(sparsity=0.75, scope=scope, where="kernel", layer_axis=axes)
    want = make(sparsity=0.75, scope=scope, where="kernel")
    step = lambda tx, p: tx.update(p, tx.init(p), p)[1]
    _assert_same_per_layer(jaxprune.masks_of(jax.jit(lambda p: step(got, p))(scanned)),
                           jaxprune.masks_of(jax.jit(lambda p: step(want, p))(unrolled)))


class NBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        self.q, self.k, self.v, self.o = (nnx.Linear(D, D, kernel_init=init, rngs=rngs)
                                          for _ in range(4))
        self.up = nnx.Linear(D, H, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(H, D, kernel_init=init, rngs=rngs)


@pytest.mark.slow
def test_scanned_nnx_transformer_gets_the_masks_of_its_unrolled_twin():
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
        return NBlock(rngs)

    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        model = stack(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    axes = jaxprune.tree.scan_axes(state)
    assert set(axes) == {f"{n}/kernel" for n in ("q", "k", "v", "o", "up", "down")}
    params = state.to_pure_dict() if hasattr(state, "to_pure_dict") else nnx.to_pure_dict(state)
    unrolled = {"params": {f"layers_{j}": jax.tree.map(lambda w: w[j], params) for j in range(L)}}
    for kw in (dict(scope="local", distribution="erk"), dict(scope="global")):
        got = M.unstructured(jaxprune.scores.magnitude(params), 0.75, where="kernel", layer_axis=axes, **kw)
        want = M.unstructured(jaxprune.scores.magnitude(unrolled), 0.75, where="kernel", **kw)
        _assert_same_per_layer({"params": {"layers": got}}, want)


def test_bad_layer_axis_is_refused_naming_the_leaf():
    with pytest.raises(ValueError, match="leaf 'w' of shape \\(2, 3\\) has no layer axis 2"):
        M.unstructured({"w": jnp.ones((2, 3))}, 0.5, layer_axis=2)
    with pytest.raises(TypeError, match="layer_axis"):
        M.unstructured({"w": jnp.ones((2, 3))}, 0.5, layer_axis="0")
    with pytest.raises(ValueError, match="layer_axis applies to"):
        jaxprune.prune(sparsity=0.5, granularity="block", layer_axis=0)


def test_lottery_local_round_prunes_each_layer_slice_like_the_unrolled_twin(linen_twins):
    scanned, unrolled, axes = linen_twins
    got = jaxprune.lottery.prune_round(scanned, None, 0.5, scope="local", where="kernel",
                                       layer_axis=axes)
    want = jaxprune.lottery.prune_round(unrolled, None, 0.5, scope="local", where="kernel")
    _assert_same_per_layer(got, want)
    got2 = jaxprune.lottery.prune_round(scanned, got, 0.5, scope="local", layer_axis=axes)
    want2 = jaxprune.lottery.prune_round(unrolled, want, 0.5, scope="local")
    _assert_same_per_layer(got2, want2)


def _active_per_layer(masks):
    stacked = masks["params"]["layers"]
    return {jaxprune.tree.path_str(p): [int(np.asarray(m)[j].sum()) for j in range(L)]
            for p, m in jax.tree_util.tree_flatten_with_path(stacked)[0]}


@pytest.mark.slow
def test_sparse_training_allocates_and_keeps_counts_per_layer_slice(linen_twins):
    scanned, unrolled, axes = linen_twins
    got = jaxprune.sparse_training.random_masks(scanned, 0.8, jax.random.key(0),
                                                where="kernel", layer_axis=axes)
    want = jaxprune.sparse_training.random_masks(unrolled, 0.8, jax.random.key(0),
                                                 where="kernel")
    counts = _active_per_layer(got)
    for path, per_layer in counts.items():
        for j in range(L):
            twin = want["params"][f"layers_{j}"]
            for key in path.split("/"):
                twin = twin[key]
            assert per_layer[j] == int(np.asarray(twin).sum()), (path, j)
    tx = jaxprune.rigl(optax.sgd(0.1), 0.8, every=1, end=100, where="kernel", layer_axis=axes)
    state = tx.init(scanned)
    grads = jax.tree.map(lambda w: jax.random.normal(jax.random.key(3), w.shape), scanned)
    @jax.jit
    def step(p, s):
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    params, state = step(scanned, state)
    params, state = step(params, state)  # step 1 drops and grows
    before = _active_per_layer(jaxprune.masks_of(tx.init(scanned)))
    assert _active_per_layer(jaxprune.masks_of(state)) == before
