"""Sharded and multi-device pruning on 8 simulated CPU devices (tests/conftest.py):
masks keep the params' sharding, the global threshold reduces only histograms
across devices, and jit / shard_map / pmap training steps agree with one device."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxprune
from jaxprune import distributed

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

def _mesh(axis_type=AxisType.Explicit):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


SPECS = {"embed": P("data", "model"), "Dense_0/kernel": P(None, "model"),
         "Dense_1/kernel": P("model", None), "Dense_1/bias": P()}


def _params(big=False):
    ks = jax.random.split(jax.random.key(0), 4)
    return {"embed": jax.random.normal(ks[0], (2048, 512) if big else (64, 32)),
            "Dense_0": {"kernel": jax.random.normal(ks[1], (32, 64))},
            "Dense_1": {"kernel": jax.random.normal(ks[2], (64, 16)),
                        "bias": jax.random.normal(ks[3], (16,))}}


def _shard(tree, mesh):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, NamedSharding(mesh, SPECS[jaxprune.tree.path_str(path)])),
        tree)


def _has_spec(x, mesh, path):
    """``x`` is laid out as ``SPECS[path]`` on ``mesh`` (checked on its type
    too, as ``jax.typeof`` reports it)."""
    want = NamedSharding(mesh, SPECS[path])
    if not x.sharding.is_equivalent_to(want, x.ndim):
        return False
    if mesh.axis_types[0] != AxisType.Explicit:  # Auto axes are not part of the type
        return True
    padded = tuple(SPECS[path]) + (None,) * (x.ndim - len(SPECS[path]))
    return tuple(jax.typeof(x).sharding.spec) == padded


def _global_masks(params):
    return jaxprune.masks.unstructured(jaxprune.scores.magnitude(params), 0.7, scope="global")


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, number of result elements) of every collective in HLO text."""
    found = []
    for m in re.finditer(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-to-all|all-reduce|"
                         r"collective-permute|reduce-scatter)(?:-start)?\(", hlo):
        dims = [int(d) for d in m.group(2).split(",") if d]
        found.append((m.group(3), int(np.prod(dims)) if dims else 1))
    return found


def _assert_only_histograms_cross_devices(fn, params):
    hlo = fn.lower(params).compile().as_text()
    ops = _collectives(hlo)
    assert ops, "expected the per-shard histograms to be all-reduced"
    assert not [op for op in ops if op[0] in ("all-gather", "all-to-all")], ops
    # Only histograms (65,536 bins) and scalars move: nothing parameter-sized.
    assert all(op == "all-reduce" and (n <= 1 << 16) for op, n in ops), ops
    return ops


def test_global_masks_on_a_2x4_mesh_match_one_device_and_keep_each_param_sharding():
    mesh = _mesh()
    params = _params()
    sharded = _shard(params, mesh)
    with jax.set_mesh(mesh):
        scores = jax.jit(jaxprune.scores.magnitude)(sharded)
        masks = jax.jit(_global_masks)(sharded)
    expected = jax.jit(_global_masks)(params)
    for path, m in jaxprune.tree.leaves_with_paths(masks):
        assert _has_spec(m, mesh, path), (path, m.sharding)
    for path, s in jaxprune.tree.leaves_with_paths(scores):
        assert _has_spec(s, mesh, path), (path, s.sharding)
    assert masks["Dense_1"]["bias"] is None
    chex.assert_trees_all_equal(jax.device_get(masks), jax.device_get(expected))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_compiled_global_threshold_all_reduces_histograms_and_gathers_no_scores(axis_type):
    mesh = _mesh(axis_type)
    sharded = _shard(_params(), mesh)
    with jax.set_mesh(mesh):
        ops = _assert_only_histograms_cross_devices(jax.jit(_global_masks), sharded)
    assert ("all-reduce", 1 << 16) in ops


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_chunked_counting_of_a_large_sharded_leaf_gathers_nothing(axis_type):
    # 2048 x 512 > threshold._CHUNK entries: counted chunk by chunk along the sharded axis 0.
    mesh = _mesh(axis_type)
    params = _params(big=True)
    sharded = _shard(params, mesh)
    fn = jax.jit(_global_masks)
    with jax.set_mesh(mesh):
        _assert_only_histograms_cross_devices(fn, sharded)
        masks = fn(sharded)
    chex.assert_trees_all_equal(jax.device_get(masks), jax.device_get(fn(params)))


def test_explicit_sharded_leaf_is_chunked_only_where_chunks_divide_over_its_devices():
    # 1028 = 4 * 257: four strided chunks of axis 0 would hold 257 rows each,
    # which cannot be split over the 4 devices of "model".
    mesh = _mesh()
    w = jax.random.normal(jax.random.key(3), (1028, 512))
    sharded = jax.device_put(w, NamedSharding(mesh, P("model", None)))
    fn = jax.jit(lambda p: _global_masks(p))
    with jax.set_mesh(mesh):
        _assert_only_histograms_cross_devices(fn, {"w": sharded})
        masks = fn({"w": sharded})
    assert masks["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
    np.testing.assert_array_equal(np.asarray(masks["w"]), np.asarray(fn({"w": w})["w"]))


def test_optimizer_state_masks_keep_each_param_sharding():
    mesh = _mesh()
    sharded = _shard(_params(), mesh)
    with jax.set_mesh(mesh):
        state = jaxprune.pruned(optax.sgd(0.1), jaxprune.scores.movement).init(sharded)
    for path, m in jaxprune.tree.leaves_with_paths(state.prune_state.masks):
        assert _has_spec(m, mesh, path), (path, m.sharding)
    for path, s in jaxprune.tree.leaves_with_paths(state.prune_state.stats):
        assert _has_spec(s, mesh, path), (path, s.sharding)


# --- one training step, four ways --------------------------------------------

STEPS, BATCH = 5, 16


def _mlp_params():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"Dense_0": {"kernel": jax.random.normal(k1, (8, 32)) / 3, "bias": jnp.zeros(32)},
            "Dense_1": {"kernel": jax.random.normal(k2, (32, 4)) / 6, "bias": jnp.zeros(4)}}


def _data():
    kx, ky = jax.random.split(jax.random.key(2))
    return (jax.random.normal(kx, (STEPS, BATCH, 8)), jax.random.normal(ky, (STEPS, BATCH, 4)))


def _loss(params, x, y):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return jnp.mean((h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"] - y) ** 2)


def _tx():
    schedule = jaxprune.schedules.polynomial(0.6, begin=0, end=4, every=2)
    # Plain SGD: a gradient off by the device count would show in the params.
    return jaxprune.pruned(optax.sgd(0.1), jaxprune.scores.saliency, schedule,
                           scope="global")


def _step(tx, params, state, x, y, axis_name=None, average="grads"):
    if axis_name is not None and average == "loss":  # shard_map rule: pmean the loss
        grads = jax.grad(lambda p: lax.pmean(_loss(p, x, y), axis_name))(params)
    else:
        grads = jax.grad(_loss)(params, x, y)
    if axis_name is not None:  # pmap rule: per-device grads, average them
        grads = distributed.average_gradients(grads, axis_name)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _run(step, params, state, xs, ys):
    for t in range(STEPS):
        params, state = step(params, state, xs[t], ys[t])
    return jax.device_get(params), jax.device_get(jaxprune.masks_of(state))


# One transformation and one jitted step for the module: the one-device run and
# the runs it is compared with share the compiled step where their inputs match.
_TX = _tx()
_jit_step = jax.jit(lambda p, s, x, y: _step(_TX, p, s, x, y))


@pytest.fixture(scope="module")
def one_device():
    params = _mlp_params()
    return _run(_jit_step, params, _TX.init(params), *_data())


def _assert_same_run(got, expected):
    params, masks = got
    chex.assert_trees_all_equal(masks, expected[1])
    # Sums split across devices round differently: masks are exact, params close.
    chex.assert_trees_all_close(params, expected[0], rtol=1e-4, atol=1e-5)
    assert float(jaxprune.sparsity(masks)) == pytest.approx(0.6, abs=0.01)


def test_jit_step_with_model_and_data_sharding_matches_one_device(one_device):
    mesh = _mesh(AxisType.Auto)
    tx = _TX
    specs = {"Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
             "Dense_1": {"kernel": P("model", None), "bias": P()}}  # Megatron-style MLP
    params = jax.device_put(_mlp_params(), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    xs, ys = jax.device_put(_data(), NamedSharding(mesh, P(None, "data")))
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        got = _run(_jit_step, params, state, xs, ys)
    _assert_same_run(got, one_device)


@pytest.mark.parametrize("average,check_vma", [("loss", True), ("grads", False)])
def test_shard_map_step_with_averaged_loss_or_gradients_matches_one_device(
        one_device, average, check_vma):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    tx = _tx()
    params = _mlp_params()
    step = jax.jit(jax.shard_map(
        lambda p, s, x, y: _step(tx, p, s, x, y, axis_name="data", average=average),
        mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()),
        check_vma=check_vma))
    with jax.set_mesh(mesh):
        got = _run(step, params, tx.init(params), *_data())
    _assert_same_run(got, one_device)


def test_pmap_step_with_pmean_gradients_matches_one_device(one_device):
    n = jax.local_device_count()
    tx = _tx()
    params = _mlp_params()
    replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)  # noqa: E731
    step = jax.pmap(lambda p, s, x, y: _step(tx, p, s, x, y, axis_name="data"),
                    axis_name="data")
    xs, ys = (d.reshape(STEPS, n, BATCH // n, -1) for d in _data())
    params_r, state_r = replicate(params), replicate(tx.init(params))
    for t in range(STEPS):
        params_r, state_r = step(params_r, state_r, xs[t], ys[t])
    masks_r = jaxprune.masks_of(state_r)
    for path, m in jaxprune.tree.leaves_with_paths(masks_r):  # every device agrees
        assert (np.asarray(m) == np.asarray(m)[0]).all(), path
    got = (jax.tree.map(lambda x: np.asarray(x)[0], params_r),
           jax.tree.map(lambda x: np.asarray(x)[0], masks_r))
    _assert_same_run(got, one_device)


def test_per_device_scores_are_averaged_before_masks_are_built():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params = _mlp_params()
    x, y = (d[0] for d in _data())
    criterion = distributed.averaged(jaxprune.scores.saliency, "data")

    def per_device_masks(params, x, y):
        grads = jax.grad(_loss)(params, x, y)  # this device's batch only
        scores = criterion.score((), params, grads, jax.random.key(0))
        return jaxprune.masks.unstructured(scores, 0.5, scope="global")

    with jax.set_mesh(mesh):
        # check_vma=False: jax.grad returns each device's own gradient.
        masks = jax.jit(jax.shard_map(per_device_masks, mesh=mesh, check_vma=False,
                                      in_specs=(P(), P("data"), P("data")), out_specs=P()))(
            params, x, y)
    local = [jaxprune.scores.saliency(params, jax.grad(_loss)(params, xi, yi))
             for xi, yi in zip(x.reshape(8, 2, -1), y.reshape(8, 2, -1))]
    mean_scores = jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *local)
    expected = jaxprune.masks.unstructured(mean_scores, 0.5, scope="global")
    chex.assert_trees_all_equal(jax.device_get(masks), jax.device_get(expected))


# --- bit-packed masks ---------------------------------------------------------

def test_bit_packed_masks_train_identically_at_one_bit_per_weight():
    tx = _TX
    packed_tx = distributed.packed(_tx())
    params = _mlp_params()
    step = _jit_step
    packed_step = jax.jit(lambda p, s, x, y: _step(packed_tx, p, s, x, y))
    xs, ys = _data()
    a, sa = params, tx.init(params)
    b, sb = params, packed_tx.init(params)
    for t in range(STEPS):
        a, sa = step(a, sa, xs[t], ys[t])
        b, sb = packed_step(b, sb, xs[t], ys[t])
    chex.assert_trees_all_equal(a, b)
    bool_masks, bits = jaxprune.masks_of(sa), jaxprune.masks_of(sb)
    assert bits["Dense_0"]["kernel"].dtype == jnp.uint8
    assert bits["Dense_0"]["kernel"].shape == (8, 4) and bits["Dense_0"]["bias"] is None
    chex.assert_trees_all_equal(distributed.unpack_masks(bits, params), bool_masks)
    # One bit per weight, each row of the last axis padded to whole bytes.
    assert sum(m.nbytes for m in jax.tree.leaves(bits)) == sum(
        m.size // m.shape[-1] * -(-m.shape[-1] // 8) for m in jax.tree.leaves(bool_masks))


def test_packing_a_sharded_mask_keeps_it_sharded():
    mesh = _mesh()
    sharded = _shard(_params(), mesh)
    with jax.set_mesh(mesh):
        masks = jax.jit(_global_masks)(sharded)
        bits = jax.jit(distributed.pack_masks)(masks)
        back = jax.jit(distributed.unpack_masks)(bits, sharded)
    assert _has_spec(bits["Dense_0"]["kernel"], mesh, "Dense_0/kernel")
    chex.assert_trees_all_equal(jax.device_get(back), jax.device_get(masks))


# --- masks whose sharding disagrees with the params ---------------------------

def test_masks_sharded_unlike_params_are_resharded_or_refused_never_wrong():
    mesh = _mesh(AxisType.Auto)
    params = _shard(_params(), mesh)
    masks = _global_masks(_params())
    wrong = jax.tree.map(lambda m: jax.device_put(m, NamedSharding(mesh, P("model"))), masks)
    expected = jaxprune.apply_masks(_params(), masks)
    # Used as they are, the result is still right (data moves between devices).
    chex.assert_trees_all_equal(jax.device_get(jaxprune.apply_masks(params, wrong)),
                                jax.device_get(expected))
    with pytest.raises(ValueError, match="'Dense_0/kernel' is sharded as"):
        distributed.match_sharding(wrong, params, strict=True)
    fixed = distributed.match_sharding(wrong, params)
    for path, m in jaxprune.tree.leaves_with_paths(fixed):
        assert _has_spec(m, mesh, path), (path, m.sharding)
    assert fixed["Dense_1"]["bias"] is None
    chex.assert_trees_all_equal(jax.device_get(fixed), jax.device_get(masks))
    with pytest.raises(ValueError, match="'Dense_1/kernel'"):
        distributed.match_sharding({**wrong, "Dense_1": {"kernel": wrong["embed"], "bias": None}},
                                   params)


def test_averaged_criterion_inside_prune_under_pmap_gives_every_device_the_same_masks():
    n = jax.local_device_count()
    params = _mlp_params()
    x, y = (d[0].reshape(n, BATCH // n, -1) for d in _data())
    tx = optax.chain(optax.sgd(0.1), jaxprune.prune(
        distributed.averaged(jaxprune.scores.saliency, "data"), 0.5, scope="global"))

    def step(params, state, x, y):
        local = jax.grad(_loss)(params, x, y)
        # The optimizer gets the averaged gradients; the criterion scores with
        # this device's own and averages the scores.
        updates, state = tx.update(distributed.average_gradients(local, "data"), state, params,
                                   grads=local)
        return state

    replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * n), tree)  # noqa: E731
    state = jax.pmap(step, axis_name="data")(replicate(params), replicate(tx.init(params)), x, y)
    masks = jax.tree.map(np.asarray, jaxprune.masks_of(state))
    for path, m in jaxprune.tree.leaves_with_paths(masks):
        assert (m == m[0]).all(), path
    local = [jaxprune.scores.saliency(params, jax.grad(_loss)(params, xi, yi))
             for xi, yi in zip(x, y)]
    mean_scores = jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *local)
    expected = jaxprune.masks.unstructured(mean_scores, 0.5, scope="global")
    chex.assert_trees_all_equal(jax.tree.map(lambda m: m[0], masks), jax.device_get(expected))


_stacked_masks = {scope: jax.jit(functools.partial(
    lambda p, scope: jaxprune.masks.unstructured(jaxprune.scores.magnitude(p), 0.7, scope=scope),
    scope=scope)) for scope in ("global", "local")}


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_equal_shaped_sharded_leaves_are_stacked_without_gathers(axis_type):
    # Leaves of one shape are stacked into one array (jaxprune.leaf_groups):
    # the stack keeps the leaves' layout and still moves only histograms.
    mesh = _mesh(axis_type)
    params = {f"l{i}": jax.random.normal(jax.random.key(i), (16, 32)) for i in range(3)}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P(None, "model")))
               for k, v in params.items()}
    for scope in ("global", "local"):
        fn = _stacked_masks[scope]  # shared: the unsharded reference compiles once per scope
        with jax.set_mesh(mesh):
            if scope == "global":
                _assert_only_histograms_cross_devices(fn, sharded)
            else:
                ops = _collectives(fn.lower(sharded).compile().as_text())
                assert not [op for op in ops if op[0] in ("all-gather", "all-to-all")], ops
            masks = fn(sharded)
        for k in params:
            assert masks[k].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
        chex.assert_trees_all_equal(jax.device_get(masks), jax.device_get(fn(params)))
