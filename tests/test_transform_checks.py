"""What prune/pruned check and refuse: hand-set sparsities, NaN weights and gradients,
the chain order, layer collapse under global scope (issues 10 and 11).

The transformations record what they find in PruneState.alerts (no host callback in the
step); jaxprune.check(opt_state) issues the warnings."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from helpers import mlp_apply, mlp_init
from jaxprune import sparse_training as S


def params_of(seed=0, sizes=(8, 16, 4)):
    return mlp_init(seed, sizes, gain=1.0)


def grads_like(params, value=1.0):
    return jax.tree.map(lambda p: jnp.full_like(p, value), params)


def kernels_pruned_zero(masks, params):
    pairs = [(m, params[k]["kernel"]) for k, m in ((k, masks[k]["kernel"]) for k in params)]
    return all(bool(jnp.all(jnp.where(m, True, p == 0))) for m, p in pairs)


def pruning_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, jaxprune.PruningWarning)]


def _injected(**kwargs):
    return optax.chain(optax.sgd(0.1), optax.inject_hyperparams(
        jaxprune.prune, static_args=jaxprune.STATIC_ARGS)(**kwargs))


def _set_sparsity(state, value):
    state[1].hyperparams["sparsity"] = jnp.asarray(value, jnp.float32)
    return state


def test_sparsity_set_through_inject_hyperparams_takes_effect_at_the_next_step():
    params = params_of()
    tx = _injected(sparsity=0.5)
    step = jax.jit(lambda p, s: tx.update(grads_like(p), s, p))
    state = tx.init(params)
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert float(jaxprune.sparsity_of(state)) == 0.5
    updates, state = step(params, _set_sparsity(state, 0.75))  # the very next step
    params = optax.apply_updates(params, updates)
    assert float(jaxprune.sparsity_of(state)) == 0.75
    assert kernels_pruned_zero(jaxprune.masks_of(state), params)
    assert float(state[1].inner_state.sparsity) == 0.75

    # With every=k, a change waits for the next multiple of k.
    tx = _injected(sparsity=0.5, every=4)
    step = jax.jit(lambda p, s: tx.update(grads_like(p), s, p))
    state = tx.init(params)
    levels = []
    for t in range(9):
        if t == 2:
            state = _set_sparsity(state, 0.25)
        _, state = step(params, state)
        levels.append(float(jaxprune.sparsity_of(state)))
    assert levels == [0.5] * 4 + [0.25] * 5


def test_out_of_range_hand_set_sparsity_is_refused_masks_kept_and_reported():
    params = params_of()
    tx = _injected(sparsity=0.5)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(grads_like(p), s, p)))
    params, state = step(params, tx.init(params))
    before = jaxprune.masks_of(state)
    for refused, bad in enumerate([1.5, -0.25, float("nan")], start=1):
        params, state = step(params, _set_sparsity(state, bad))
        with pytest.warns(jaxprune.PruningWarning,
                          match=rf"refused {refused} mask update.*outside \[0, 1\]"):
            jaxprune.check(state)
        jax.tree.map(np.testing.assert_array_equal, jaxprune.masks_of(state), before)
        assert int(state[1].inner_state.refused) == refused
        assert float(state[1].inner_state.sparsity) == 0.5


def test_nan_and_inf_weights_at_pruned_positions_are_reported_with_the_remedy():
    params = params_of()
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[0, 0].set(-jnp.inf)
    tx = optax.chain(optax.adam(1e-2), jaxprune.prune(
        score=lambda p: jax.tree.map(lambda x: -jnp.abs(x), p), sparsity=0.5, signed=True))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(grads_like(p), s, p))
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    with pytest.warns(jaxprune.PruningWarning, match="non-finite"):
        messages = jaxprune.check(state)
    found = [m for m in messages if "non-finite" in m]
    # -|x| ranks inf lowest (pruned) and NaN lowest: both are pruned and stay non-finite.
    assert len(found) == 1, messages
    assert "'Dense_0/kernel'" in found[0] and "'Dense_1/kernel'" in found[0]
    assert "jaxprune.apply_masks" in found[0]
    assert bool(state[1].alerts.nonfinite.all())
    fixed = jaxprune.apply_masks(params, jaxprune.masks_of(state))
    assert kernels_pruned_zero(jaxprune.masks_of(state), fixed)
    assert not kernels_pruned_zero(jaxprune.masks_of(state), params)


TRANSFORMS = {
    "prune": lambda: optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=0.5)),
    "pruned": lambda: jaxprune.pruned(optax.adam(1e-2), sparsity=0.5),
    "rigl": lambda: S.rigl(optax.adam(1e-2), 0.5, end=100, every=1, distribution="uniform"),
    "set": lambda: S.sparse_evolutionary(optax.adam(1e-2), 0.5, every=1,
                                         distribution="uniform"),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_nan_gradients_never_reach_pruned_weights(name):
    params = params_of(1)
    tx = TRANSFORMS[name]()
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    state = tx.init(params)
    params, state = step(params, state, grads_like(params))
    # NaN gradients at every position, pruned ones included (RigL and SET also update masks
    # on this step). Kept weights turn NaN, as they must; pruned weights stay exactly 0.
    params, state = step(params, state, grads_like(params, jnp.nan))
    assert kernels_pruned_zero(jaxprune.masks_of(state), params), name
    if name == "pruned":  # and the optimizer state of pruned weights never saw them
        adam = state.inner_state[0]
        assert kernels_pruned_zero(jaxprune.masks_of(state), adam.mu)
        assert kernels_pruned_zero(jaxprune.masks_of(state), adam.nu)


def test_ste_forward_ignores_nan_dense_weights_at_pruned_positions():
    w = {"w": jnp.array([[1.0, jnp.nan], [jnp.inf, 2.0]])}
    m = {"w": jnp.array([[True, False], [False, True]])}
    out = jaxprune.ste_apply(w, m)["w"]
    assert out.tolist() == [[1.0, 0.0], [0.0, 2.0]]


def test_wrong_chain_order_warns_once_with_the_fix_and_the_right_order_is_silent():
    params = params_of(2)
    x = jax.random.normal(jax.random.key(0), (16, 8))
    loss = lambda p: jnp.mean(mlp_apply(p, x) ** 2)  # noqa: E731
    sched = jaxprune.schedules.polynomial(0.8, begin=0, end=8, every=2)
    # The case: masks set once at step 0, so only the step after can tell.
    for tx, expect in [(optax.chain(jaxprune.prune(sparsity=0.9), optax.adam(1e-2)), 1),
                       (optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=sched)), 0)]:
        state = tx.init(params)
        step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p))
        p = params
        for _ in range(10):
            updates, state = step(p, state)
            p = optax.apply_updates(p, updates)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            jaxprune.check(state)
        found = [m for m in pruning_warnings(record) if "LAST in the chain" in m]
        assert len(found) == expect, pruning_warnings(record)
        if expect:
            assert "optax.chain(optax.adam(1e-3), jaxprune.prune(...))" in found[0]


def test_checks_stay_inside_the_mask_update_cond_and_never_call_the_host():
    # Ordinary steps must not pay for the checks: one cond holds them all, and no host
    # callback is compiled into the step (it would take JAX's fast dispatch path away).
    params = params_of()
    tx = optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=0.9, scope="global"))
    jaxpr = jax.make_jaxpr(lambda p, s: tx.update(p, s, p))(params, tx.init(params))
    top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert top.count("cond") == 1
    assert not [e for e in top if e in ("reduce_or", "reduce_max", "reduce_sum", "while")], top
    assert _callbacks(jaxpr.jaxpr) == (0, 0)


def _callbacks(jaxpr, in_cond=False):
    """(callbacks outside any cond, callbacks inside one), recursively."""
    counts = [0, 0]
    for e in jaxpr.eqns:
        if e.primitive.name == "debug_callback":
            counts[in_cond] += 1
        for sub in _subjaxprs(e.params):
            a, b = _callbacks(sub, in_cond or e.primitive.name == "cond")
            counts[0] += a
            counts[1] += b
    return tuple(counts)


def _subjaxprs(params):
    for v in params.values():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def test_movement_scores_are_signed_and_do_not_warn():
    params = params_of(3)
    tx = jaxprune.pruned(optax.adam(1e-2), score=jaxprune.scores.movement,
                         sparsity=jaxprune.schedules.polynomial(0.5, begin=0, end=4, every=2))
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for t in range(5):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
        updates, state = step(params, state, g)
        params = optax.apply_updates(params, updates)
    assert float(jaxprune.sparsity(state.prune_state.masks)) == 0.5
    assert jaxprune.check(state) == []
    custom = jaxprune.pruned(optax.adam(1e-2), score=lambda p: p, sparsity=0.5)  # raw weights
    _, state = jax.jit(lambda p, s: custom.update(p, s, p))(params, custom.init(params))
    with pytest.warns(jaxprune.PruningWarning, match="negative values"):
        jaxprune.check(state)


def _cnn():
    import flax.linen as nn

    class CNN(nn.Module):  # the network of the issue: global average pooling before the head
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
            x = nn.relu(nn.Dense(128)(x.mean(axis=(1, 2))))
            return nn.Dense(10)(x)

    return CNN()


@pytest.mark.slow
def test_global_pruning_of_a_fresh_cnn_keeps_every_layer_and_trains():
    (x, y), _ = jaxprune.data.digits()
    x, y = jnp.asarray(x[:256]).reshape(-1, 8, 8, 1), jnp.asarray(y[:256])
    model = _cnn()
    variables = model.init(jax.random.key(0), x[:1])
    scores = jaxprune.scores.magnitude(variables["params"])
    unguarded = jaxprune.masks.unstructured(scores, 0.9, scope="global", min_density=0.0)
    assert float(unguarded["Conv_1"]["kernel"].mean()) == 0.0  # the collapse of the issue
    tx = optax.chain(optax.adam(1e-2), jaxprune.prune(sparsity=0.9, scope="global"))

    @jax.jit
    def step(params, stats, state):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, x,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), new["batch_stats"], state, loss

    params, stats, state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    losses = []
    for _ in range(40):
        params, stats, state, loss = step(params, stats, state)
        losses.append(float(loss))
    with pytest.warns(jaxprune.PruningWarning, match="'Conv_1/kernel' .layer collapse"):
        masks = jaxprune.masks_of(state)
    assert all(float(m.mean()) > 0 for m in jax.tree.leaves(masks))
    assert float(jaxprune.sparsity(masks)) == pytest.approx(0.9, abs=1e-4)
    # Without the guard the output is constant and the loss stays at 2.295 (measured).
    assert losses[-1] < math.log(10) - 0.5, losses[::5]


def test_global_magnitude_masks_of_the_fresh_cnn_keep_conv_1_and_say_so():
    variables = _cnn().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    scores = jaxprune.scores.magnitude(variables["params"])
    with pytest.warns(jaxprune.PruningWarning, match=r"'Conv_1/kernel' \(layer collapse\)"):
        masks = jaxprune.masks.unstructured(scores, 0.9, scope="global")
    # Conv_1 keeps a tenth of its uniform share: ceil((18432 - 16589) / 10) = 185 weights.
    assert int(masks["Conv_1"]["kernel"].sum()) == 185
    n = sum(m.size for m in jax.tree.leaves(masks))
    assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == round(np.float32(0.9) * n)


def test_n_of_m_in_prune_and_ste_defaults_to_the_input_axis_of_a_ten_class_head():
    params = params_of(4, sizes=(8, 16, 10))  # Dense_1/kernel (16, 10): axis -1 would not divide
    for tx in (optax.chain(optax.sgd(0.1), jaxprune.prune(granularity="n_of_m")),
               optax.chain(optax.sgd(0.1), jaxprune.ste(granularity="n_of_m"))):
        _, state = tx.update(params, tx.init(params), params)
        head = np.asarray(jaxprune.masks_of(state)["Dense_1"]["kernel"])
        assert (head.reshape(4, 4, 10).sum(axis=1) == 2).all()  # 2 of every 4 inputs
    odd = params_of(4, sizes=(6, 16, 10))  # Dense_0/kernel (6, 16): 6 inputs
    tx = jaxprune.prune(granularity="n_of_m")
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*reduction axis 0.*axis="):
        tx.update(odd, tx.init(odd), odd)
