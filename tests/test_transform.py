"""jaxprune.prune / jaxprune.pruned as optax transformations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from helpers import train_linen
from jaxprune import schedules


def mlp_params(key, dtype=jnp.float32, sizes=(8, 16, 4)):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {"kernel": (jax.random.normal(sub, (a, b)) / np.sqrt(a)).astype(dtype),
                                "bias": jnp.zeros(b, dtype)}
    return params


def pairs(masks, tree):
    """[(mask, leaf)] for every masked leaf of ``tree``."""
    by_path = dict(jaxprune.tree.leaves_with_paths(tree))
    return [(m, by_path[p]) for p, m in jaxprune.tree.leaves_with_paths(masks)]


def all_pruned_zero(masks, tree):
    return jnp.all(jnp.stack([jnp.all(jnp.where(m, True, x == 0)) for m, x in pairs(masks, tree)]))


def mlp(params, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def loss_fn(params, x, y):
    return jnp.mean((mlp(params, x.astype(params["Dense_0"]["kernel"].dtype)) - y) ** 2)


DATA_X = jax.random.normal(jax.random.key(10), (32, 8))
DATA_Y = jax.random.normal(jax.random.key(11), (32, 4))

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
}

SCHEDULE = schedules.polynomial(0.8, begin=0, end=300, every=25)


def run(tx, params, steps, x=DATA_X, y=DATA_Y):
    """``steps`` jitted steps in one scan; returns params, state, and per step
    whether every pruned weight was exactly zero after the update."""
    state = tx.init(params)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), all_pruned_zero(jaxprune.masks_of(state), params)

    (params, state), zeros = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
        (params, state))
    return params, state, zeros


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS) + ["multisteps"])
def test_pruned_weights_stay_exactly_zero_for_500_steps(name, dtype):
    if name == "multisteps":
        tx = optax.MultiSteps(optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=SCHEDULE)),
                              every_k_schedule=3)
    else:
        tx = optax.chain(OPTIMIZERS[name](), jaxprune.prune(sparsity=SCHEDULE))
    params, state, zeros = run(tx, mlp_params(jax.random.key(0), dtype), 500)
    assert bool(zeros.all()), f"pruned weights became nonzero at step {int(np.argmin(zeros))}"
    masks = jaxprune.masks_of(state)
    inner_steps = 500 if name != "multisteps" else 500 // 3
    last_update = max(t for t in range(inner_steps) if bool(SCHEDULE.is_update_step(t)))
    expected = float(SCHEDULE(last_update))
    for m in jax.tree.leaves(masks):
        assert int((~m).sum()) == round(expected * m.size)
    for m, p in pairs(masks, params):
        assert p.dtype == dtype
        assert bool(jnp.all(jnp.where(m, True, p == 0)))


def test_sparsity_never_decreases_and_masks_nest_along_the_schedule():
    params = mlp_params(jax.random.key(1))
    tx = optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=SCHEDULE, scope="global"))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p, DATA_X, DATA_Y), s, p))
    previous, levels = None, []
    for t in range(320):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        masks = jaxprune.masks_of(state)
        if previous is not None:
            for old, new in zip(jax.tree.leaves(previous), jax.tree.leaves(masks)):
                assert not bool(jnp.any(new & ~old)), f"a pruned weight came back at step {t}"
        previous = masks
        levels.append(float(jaxprune.sparsity(masks)))
    assert levels == sorted(levels)
    n = sum(m.size for m in jax.tree.leaves(masks))
    assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == round(0.8 * n)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_fused_magnitude_scores_give_the_masks_of_materialised_scores(scope):
    # scores.magnitude is applied inside the threshold passes (|w| is never
    # stored); an equivalent plain callable goes through the stored scores.
    params = mlp_params(jax.random.key(4))
    fused = optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=SCHEDULE, scope=scope))
    plain = optax.chain(optax.adam(1e-2), jaxprune.prune(
        score=lambda p: jax.tree.map(jnp.abs, p), sparsity=SCHEDULE, scope=scope))
    _, fused_state, _ = run(fused, params, 120)
    _, plain_state, _ = run(plain, params, 120)
    masks = jaxprune.masks_of(fused_state)
    assert 0.2 < float(jaxprune.sparsity(masks)) < 0.8  # mid-schedule: real updates happened
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(jaxprune.masks_of(plain_state))):
        np.testing.assert_array_equal(a, b)


def test_masks_only_change_on_update_steps():
    params = mlp_params(jax.random.key(2))
    sched = schedules.polynomial(0.5, begin=10, end=40, every=10)
    tx = optax.chain(optax.sgd(0.1), jaxprune.prune(sparsity=sched))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p, DATA_X, DATA_Y), s, p))
    changes = []
    for t in range(50):
        before = jaxprune.masks_of(state)
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        after = jaxprune.masks_of(state)
        if any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))):
            changes.append(t)
    assert changes == [20, 30, 40]  # at t=10 the schedule's sparsity is still 0


def test_schedules_values_and_update_steps():
    s = schedules.polynomial(0.9, begin=100, end=1000, every=50)
    assert float(s(0)) == 0.0 and float(s(1000)) == pytest.approx(0.9)
    t = 550
    assert float(s(t)) == pytest.approx(0.9 * (1 - (1 - (t - 100) / 900) ** 3), rel=1e-5)
    ups = [t for t in range(1200) if bool(s.is_update_step(t))]
    assert ups[0] == 100 and ups[-1] == 1000 and all(u % 50 == 0 for u in ups)
    it = schedules.iterative(rounds=3, per_round=0.2, every=100)
    assert [t for t in range(500) if bool(it.is_update_step(t))] == [100, 200, 300]
    assert float(it(300)) == pytest.approx(1 - 0.8 ** 3)
    oneshot = schedules.one_shot(0.7, step=5)
    assert [bool(oneshot.is_update_step(t)) for t in (4, 5, 6)] == [False, True, False]
    sched = jax.jit(lambda t: (s(t), s.is_update_step(t)))(jnp.int32(150))
    assert bool(sched[1])


def test_any_optax_schedule_is_a_sparsity_schedule():
    params = mlp_params(jax.random.key(3))
    tx = optax.chain(optax.sgd(0.1), jaxprune.prune(
        sparsity=optax.linear_schedule(0.0, 0.5, 20), every=5))
    _, state, zeros = run(tx, params, 30)
    assert bool(zeros.all())
    assert float(jaxprune.sparsity_of(state)) == pytest.approx(0.5)


@pytest.mark.parametrize("score", ["saliency", "taylor", "movement", "fisher", "random"])
def test_gradient_and_random_criteria_run_in_the_wrapper_form(score):
    fn = getattr(jaxprune.scores, score)
    params = mlp_params(jax.random.key(4))
    tx = jaxprune.pruned(optax.adam(1e-2), score=fn,
                         sparsity=schedules.polynomial(0.6, begin=0, end=20, every=5))
    params, state, zeros = run(tx, params, 25)
    assert bool(zeros.all())
    for m in jax.tree.leaves(jaxprune.masks_of(state)):
        assert int((~m).sum()) == round(0.6 * m.size)


def test_prune_with_gradient_score_takes_grads_as_extra_argument():
    params = mlp_params(jax.random.key(5))
    tx = optax.chain(optax.adam(1e-2), jaxprune.prune(score=jaxprune.scores.saliency, sparsity=0.5))
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params, DATA_X, DATA_Y)
    with pytest.raises(ValueError, match="grads=grads"):
        tx.update(grads, state, params)
    updates, state = tx.update(grads, state, params, grads=grads)
    expected = jaxprune.masks.unstructured(jaxprune.scores.saliency(params, grads), 0.5)
    jax.tree.map(np.testing.assert_array_equal, jaxprune.masks_of(state), expected)


def test_wrapper_keeps_inner_moments_of_pruned_weights_at_zero():
    params = mlp_params(jax.random.key(6))
    tx = jaxprune.pruned(optax.adam(1e-2), sparsity=SCHEDULE)
    params, state, zeros = run(tx, params, 400)
    assert bool(zeros.all())
    masks = jaxprune.masks_of(state)
    adam_state = state.inner_state[0]
    for moments in (adam_state.mu, adam_state.nu):
        assert bool(all_pruned_zero(masks, moments))


def test_update_options_reach_the_mask_core():
    params = mlp_params(jax.random.key(7), sizes=(8, 16, 8))
    for kwargs, check in [
        (dict(granularity="n_of_m", n=2, m=4, axis=0),
         lambda m: (np.asarray(m).T.reshape(-1, 4).sum(-1) == 2).all()),
        (dict(granularity="block", block_shape=(4, 4), sparsity=0.5),
         lambda m: int((~np.asarray(m)).sum()) == m.size // 2),
        (dict(granularity="channels", sparsity=0.5),
         lambda m: (np.asarray(m).all(0) | ~np.asarray(m).any(0)).all()),
        (dict(sparsity=0.5, distribution="erk"), lambda m: True),
        (dict(sparsity=0.5, scope="global", normalize="lamp", min_density=0.1), lambda m: True),
    ]:
        kwargs.setdefault("sparsity", 0.0)
        tx = optax.chain(optax.sgd(0.1), jaxprune.prune(**kwargs))
        _, state, zeros = run(tx, params, 2, y=jnp.ones((32, 8)))
        assert bool(zeros.all())
        for m in jax.tree.leaves(jaxprune.masks_of(state)):
            assert check(m), kwargs


def test_works_with_inject_hyperparams_masked_and_multi_transform():
    params = mlp_params(jax.random.key(8))
    injected = optax.chain(optax.sgd(0.1), optax.inject_hyperparams(
        jaxprune.prune, static_args=jaxprune.STATIC_ARGS)(sparsity=0.5, every=1))
    _, state, zeros = run(injected, params, 3)
    assert bool(zeros.all()) and float(jaxprune.sparsity_of(state)) == 0.5
    state[1].hyperparams["sparsity"] = jnp.asarray(0.75)  # changed by hand mid-run
    state = (state[0], state[1])
    updates, state = injected.update(params, state, params)
    assert float(jaxprune.sparsity_of(state)) == 0.75

    only_first = optax.chain(optax.sgd(0.1), optax.masked(
        jaxprune.prune(sparsity=0.5), {"Dense_0": {"kernel": True, "bias": False},
                                       "Dense_1": {"kernel": False, "bias": False}}))
    p2, state, _ = run(only_first, params, 3)
    assert float(jaxprune.sparsity(p2["Dense_0"]["kernel"][None] == 0)) < 1.0
    assert float(jnp.mean(p2["Dense_0"]["kernel"] == 0)) == 0.5
    assert float(jnp.mean(p2["Dense_1"]["kernel"] == 0)) == 0.0

    labels = {"Dense_0": {"kernel": "prune", "bias": "plain"},
              "Dense_1": {"kernel": "prune", "bias": "plain"}}
    multi = optax.multi_transform(
        {"prune": optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=0.75)),
         "plain": optax.sgd(0.1)}, labels)
    p3, _, _ = run(multi, params, 3)
    assert float(jnp.mean(p3["Dense_1"]["kernel"] == 0)) == 0.75


def test_flax_nnx_optimizer_keeps_pruned_weights_at_zero():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    model = Net(nnx.Rngs(0))
    tx = optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=schedules.polynomial(
        0.75, begin=0, end=10, every=2), where="kernel"))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(DATA_X) - DATA_Y) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(15):
        step(model, optimizer)
    kernels = [model.a.kernel[...], model.b.kernel[...]]
    assert [float(jnp.mean(k == 0)) for k in kernels] == [0.75, 0.75]


def test_flax_linen_train_state_style_loop():
    import flax.linen as nn

    net = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    variables = net.init(jax.random.key(0), DATA_X)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=1e-4),
                     jaxprune.prune(sparsity=0.9, scope="global"))
    params, _ = train_linen(net.apply, variables["params"], tx, DATA_X, DATA_Y, 5)
    assert float(jaxprune.sparsity(params)) == pytest.approx(0.9, abs=1 / 192)


def test_same_training_under_jit_pmap_and_sharded_batch():
    params = mlp_params(jax.random.key(9))
    tx = optax.chain(optax.sgd(0.05), jaxprune.prune(sparsity=schedules.polynomial(
        0.5, begin=0, end=8, every=2), scope="global"))
    x = jax.random.normal(jax.random.key(1), (64, 8))
    y = jax.random.normal(jax.random.key(2), (64, 4))

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def single(params, state, x, y):
        return update(params, state, jax.grad(loss_fn)(params, x, y))

    @functools.partial(jax.pmap, axis_name="batch")
    def replicated(params, state, x, y):
        grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "batch")
        return update(params, state, grads)

    mesh = jax.make_mesh((8,), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    p1, s1 = params, tx.init(params)
    p2, s2 = jax.tree.map(lambda a: jnp.stack([a] * 8), (params, tx.init(params)))
    p3, s3 = jax.device_put((params, tx.init(params)), replicated_sharding)
    xs, ys = x.reshape(8, 8, 8), y.reshape(8, 8, 4)
    x3, y3 = jax.device_put((x, y), batch_sharding)
    for _ in range(10):
        p1, s1 = single(p1, s1, x, y)
        p2, s2 = replicated(p2, s2, xs, ys)
        p3, s3 = single(p3, s3, x3, y3)
    for other_p, other_s in [(jax.tree.map(lambda a: a[0], p2), jax.tree.map(lambda a: a[0], s2)),
                             (p3, s3)]:
        jax.tree.map(np.testing.assert_array_equal, jaxprune.masks_of(s1),
                     jaxprune.masks_of(other_s))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     p1, other_p)


# --- bad input ---------------------------------------------------------------

def test_bad_schedules_and_targets_are_rejected():
    with pytest.raises(ValueError, match="begin < end"):
        schedules.polynomial(0.9, begin=100, end=50, every=10)
    with pytest.raises(ValueError, match="target"):
        schedules.polynomial(1.5, begin=0, end=50, every=10)
    with pytest.raises(ValueError, match="sparsity"):
        jaxprune.prune(sparsity=-0.2)
    with pytest.raises(ValueError, match="every"):
        schedules.polynomial(0.5, begin=0, end=10, every=0)
    with pytest.raises(ValueError, match="granularity"):
        jaxprune.prune(granularity="diagonal")


def test_update_without_params_is_a_clear_error():
    params = mlp_params(jax.random.key(0))
    tx = optax.chain(optax.sgd(0.1), jaxprune.prune(sparsity=0.5))
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(params, state)


def test_state_from_a_different_model_names_the_mismatching_path():
    params = mlp_params(jax.random.key(0))
    tx = optax.chain(optax.sgd(0.1), jaxprune.prune(sparsity=0.5))
    state = tx.init(params)
    bigger = mlp_params(jax.random.key(0), sizes=(8, 32, 4))
    with pytest.raises(ValueError, match="Dense_0/kernel.*different model"):
        tx.update(bigger, state, bigger)
    renamed = {"encoder": params["Dense_0"], "Dense_1": params["Dense_1"]}
    with pytest.raises(ValueError, match="Dense_0|encoder"):
        tx.update(renamed, state, renamed)


@pytest.mark.parametrize("kwargs", [
    dict(sparsity=schedules.polynomial(0.9, begin=0, end=4, every=1)),
    dict(sparsity=schedules.constant(0.7, every=2), distribution="erk"),
    dict(sparsity=0.6, distribution={"Dense_0": 0.3, ".*": 0.8}),
    dict(sparsity=schedules.polynomial(0.95, begin=0, end=4, every=1), scope="global"),
])
def test_stacked_mask_update_equals_the_per_leaf_update(kwargs):
    # Local magnitude pruning stacks params and masks once per update, shared by the
    # checks and the selection. Masks, params and alerts must equal the per-leaf path
    # step for step: equal leaves in one stack, one leaf alone, an unselected bias,
    # a NaN weight that gets pruned.
    keys = jax.random.split(jax.random.key(4), 5)
    shapes = [(12, 8), (8, 4), (12, 8), (12, 8)]  # stacks [0, 2, 3] and [1]: not leaf order
    params = {f"Dense_{i}": {"kernel": jax.random.normal(k, s), "bias": jnp.ones(s[1])}
              for i, (k, s) in enumerate(zip(keys, shapes))}
    params["Dense_2"]["kernel"] = params["Dense_2"]["kernel"].at[0, 0].set(jnp.nan)
    params["Dense_3"]["kernel"] = params["Dense_3"]["kernel"] * 1e-3  # global scope would empty it
    rule = jaxprune.transform.schedule_rule(**kwargs)
    assert rule.update_stacked is not None
    per_leaf = rule._replace(update_stacked=None)
    txs = [optax.chain(optax.sgd(0.1), jaxprune.prune(rule=r)) for r in (rule, per_leaf)]
    grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
    runs = []
    for tx in txs:
        p, state, update = params, tx.init(params), jax.jit(tx.update)
        history = []
        for _ in range(5):
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
            history.append((jax.tree.map(np.asarray, optax.tree_utils.tree_get(state, "masks")),
                            jax.tree.map(np.asarray, p),
                            jax.tree.map(np.asarray, optax.tree_utils.tree_get(state, "alerts"))))
        runs.append(history)
    for (m1, p1, a1), (m2, p2, a2) in zip(*runs):
        jax.tree.map(np.testing.assert_array_equal, m1, m2)
        jax.tree.map(np.testing.assert_array_equal, p1, p2)
        jax.tree.map(np.testing.assert_array_equal, a1, a2)
    assert not runs[0][-1][0]["Dense_2"]["kernel"][0, 0]  # the NaN weight was pruned
    if kwargs.get("scope") == "global":  # the layer-collapse guard acted and said so
        assert runs[0][-1][2].collapse.tolist() == [False, False, False, True]
        assert runs[0][-1][0]["Dense_3"]["kernel"].sum() > 0
