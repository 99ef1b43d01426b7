"""RigL, SET, static sparse, fixed masks and STE (jaxprune.sparse_training)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune
from helpers import mlp_apply, mlp_init
from jaxprune import allocation, threshold
from jaxprune import sparse_training as S


def mlp_params(seed=0, sizes=(8, 16, 16, 4)):
    return mlp_init(seed, sizes, gain=1.0)


def forward(params, x):
    return mlp_apply(params, x, jnp.tanh)


def loss_fn(params, x, y):
    return jnp.mean((forward(params, x) - y) ** 2)


def data(seed=0, n=32):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, 8)), jnp.float32),
            jnp.asarray(rng.normal(size=(n, 4)), jnp.float32))


def kernels(tree):
    return {k: v["kernel"] for k, v in tree.items()}


def erk_active_counts(params, sparsity):
    shapes = [v.shape for v in kernels(params).values()]
    per_leaf = allocation.erk(sparsity, shapes)
    return [int(np.prod(s)) - threshold.prune_count(p, int(np.prod(s)))
            for s, p in zip(shapes, per_leaf)]


def make_step(tx):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    return step


@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_dynamic_sparse_training_keeps_per_leaf_active_count_exactly(algorithm):
    params = mlp_params(0, (8, 16, 4))
    if algorithm == "rigl":
        tx = S.rigl(optax.adam(1e-2), 0.8, every=2, end=40, drop_fraction=0.5)
    else:
        tx = S.sparse_evolutionary(optax.adam(1e-2), 0.8, every=2, drop_fraction=0.5)
    state = tx.init(params)
    expected = erk_active_counts(params, 0.8)
    first = jaxprune.masks_of(state)
    step = make_step(tx)
    x, y = data()
    changed = 0
    previous = first
    for _ in range(20):
        params, state = step(params, state, x, y)
        masks = jaxprune.masks_of(state)
        assert [int(m.sum()) for m in jax.tree.leaves(kernels(masks))] == expected
        assert all(m is None for m in jax.tree.leaves(
            {k: v["bias"] for k, v in masks.items()}, is_leaf=lambda z: z is None))
        for m, w in zip(jax.tree.leaves(kernels(masks)), jax.tree.leaves(kernels(params))):
            assert not np.any(np.asarray(w)[~np.asarray(m)]), "a pruned weight is not 0"
        changed += sum(int((a != b).sum()) for a, b in zip(jax.tree.leaves(masks),
                                                           jax.tree.leaves(previous)))
        previous = masks
    assert changed > 0, "masks never moved"


def _with_masks(state, masks, count):
    ps = state.prune_state._replace(masks=masks, count=jnp.asarray(count, jnp.int32))
    return state._replace(prune_state=ps)


def test_rigl_drops_smallest_active_and_grows_largest_gradient_with_fresh_state():
    w = jnp.array([[5.0, 0.1, 3.0, 0.0, 0.0, 0.0, 0.0, -2.0]])
    mask = jnp.array([[True, True, True, False, False, False, False, True]])
    g = jnp.array([[1.0, 0.2, -1.0, 1.0, -4.0, 0.5, 3.0, 0.0]])
    params = {"w": w, "b": jnp.zeros(1)}
    grads = {"w": g, "b": jnp.ones(1)}
    tx = S.rigl(optax.adam(0.1), 0.5, every=10, end=10**6, drop_fraction=0.5,
                distribution="uniform")
    state = tx.init(params)
    adam, rest = state.inner_state
    busy = adam._replace(mu=jax.tree.map(jnp.ones_like, adam.mu),
                         nu=jax.tree.map(jnp.ones_like, adam.nu))
    state = _with_masks(state._replace(inner_state=(busy, rest)),
                        {"w": mask, "b": None}, count=10)

    updates, state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    new_mask = jaxprune.masks_of(state)["w"]
    # Dropped: 0.1 and -2.0 (smallest |w| among active); grown: |g| = 4 and 3.
    assert new_mask.tolist() == [[True, False, True, False, True, False, True, False]]
    grown = np.array([4, 6])
    dropped = np.array([1, 7])
    out = np.asarray(new_params["w"])[0]
    assert np.all(out[grown] == 0.0) and np.all(out[dropped] == 0.0)
    assert out[0] != 5.0 and out[2] != 3.0, "survivors take their normal step"
    adam = state.inner_state[0]
    for moment in (adam.mu["w"], adam.nu["w"]):
        moment = np.asarray(moment)[0]
        assert np.all(moment[grown] == 0.0) and np.all(moment[dropped] == 0.0)
        assert np.all(moment[[0, 2]] != 0.0)
    # The grown weights train from the next step on.
    updates, state = tx.update(grads, state, new_params)
    assert np.all(np.asarray(optax.apply_updates(new_params, updates)["w"])[0, grown] != 0.0)


def test_rigl_drop_fraction_follows_cosine_and_stops_after_end():
    alpha, every, end, n = 0.3, 3, 30, 1024
    params = {"w": jax.random.normal(jax.random.key(1), (32, 32))}
    tx = S.rigl(optax.sgd(0.0), 0.5, every=every, end=end, drop_fraction=alpha,
                distribution="uniform")
    state = tx.init(params)
    n_active = n // 2

    @jax.jit
    def step(params, state, key):
        mask = jaxprune.masks_of(state)["w"]
        # Active weights have gradient 0, inactive ones |g| >= 1: nothing dropped regrows.
        g = jnp.where(mask, 0.0, 1.0 + jnp.abs(jax.random.normal(key, (32, 32))))
        updates, new_state = tx.update({"w": g}, state, params)
        return optax.apply_updates(params, updates), new_state, mask

    for t in range(end + 10):
        params, state, old = step(params, state, jax.random.key(t))
        new = jaxprune.masks_of(state)["w"]
        assert int(new.sum()) == n_active
        n_dropped = int((old & ~new).sum())
        if t > 0 and t % every == 0 and t < end:
            exact = alpha * (1 + np.cos(np.pi * t / end)) / 2 * n_active
            assert abs(n_dropped - exact) <= 0.5 + 1e-4, (t, n_dropped, exact)
            assert n_dropped > 0
        else:
            assert n_dropped == 0, t


def test_set_grows_at_random_among_inactive_entries():
    params = {"w": jax.random.normal(jax.random.key(2), (16, 16))}
    grown_sets = []
    for seed in (0, 1):
        tx = S.sparse_evolutionary(optax.sgd(0.0), 0.5, every=1, drop_fraction=0.25,
                                   distribution="uniform", seed=seed)
        state = tx.init(params)
        p = params
        old = jaxprune.masks_of(state)["w"]
        # The gradient favours the first entries: SET must ignore it.
        g = {"w": jnp.arange(256.0, 0.0, -1.0).reshape(16, 16)}
        update = jax.jit(tx.update)
        for _ in range(2):
            updates, state = update(g, state, p)
            p = optax.apply_updates(p, updates)
        new = jaxprune.masks_of(state)["w"]
        grown = new & ~old
        assert int(new.sum()) == 128 and int(grown.sum()) > 0
        assert np.all(np.asarray(p["w"])[np.asarray(grown)] == 0.0)
        grown_sets.append(np.asarray(grown))
    assert not np.array_equal(grown_sets[0], grown_sets[1])


def _reference_drop_and_grow(mask, drop, grow, fraction):
    mask = mask.ravel()
    n_drop = int(np.round(np.float64(np.float32(fraction)) * mask.sum()))
    idx = np.arange(mask.size)
    active = idx[mask]
    dropped = active[np.lexsort((active, drop.ravel()[active]))[:n_drop]]
    kept = mask.copy()
    kept[dropped] = False
    free = idx[~kept]
    grown = free[np.lexsort((free, -grow.ravel()[free]))[:n_drop]]
    out = kept.copy()
    out[grown] = True
    return out


small = st.integers(0, 4).map(float)


@given(mask=st.lists(st.booleans(), min_size=16, max_size=16),
       drop=st.lists(small, min_size=16, max_size=16),
       grow=st.lists(small, min_size=16, max_size=16),
       fraction=st.floats(0.0, 1.0))
def test_drop_and_grow_matches_sorting_reference_with_ties(mask, drop, grow, fraction):
    mask, drop, grow = (np.array(mask).reshape(4, 4), np.array(drop, np.float32).reshape(4, 4),
                        np.array(grow, np.float32).reshape(4, 4))
    out = _jit_drop_and_grow(jnp.asarray(mask), jnp.asarray(drop), jnp.asarray(grow),
                             jnp.float32(fraction))
    assert int(out.sum()) == int(mask.sum())
    np.testing.assert_array_equal(np.asarray(out).ravel(),
                                  _reference_drop_and_grow(mask, drop, grow, fraction))


_jit_drop_and_grow = jax.jit(S.drop_and_grow)


def test_static_sparse_masks_never_change_and_match_erk_counts():
    params = mlp_params(3)
    tx = S.static_sparse(optax.adam(1e-2), 0.9, seed=3)
    state = tx.init(params)
    first = jaxprune.masks_of(state)
    assert [int(m.sum()) for m in jax.tree.leaves(kernels(first))] == \
        erk_active_counts(params, 0.9)
    step = make_step(tx)
    x, y = data(1)
    for _ in range(5):
        params, state = step(params, state, x, y)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), first,
                              jaxprune.masks_of(state))
    assert all(jax.tree.leaves(same))
    assert abs(float(jaxprune.sparsity(kernels(params))) - 0.9) < 0.01
    other = S.static_sparse(optax.adam(1e-2), 0.9, seed=4).init(params)
    assert not all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), first, jaxprune.masks_of(other))))


def test_fixed_masks_train_only_the_given_subnetwork():
    params = mlp_params(4)
    masks = jaxprune.masks.unstructured(jaxprune.scores.magnitude(params), 0.5)
    tx = S.fixed_masks(optax.adam(1e-2), masks)
    state = tx.init(params)
    step = make_step(tx)
    x, y = data(2)
    for _ in range(3):
        params, state = step(params, state, x, y)
    for m, w in zip(jax.tree.leaves(kernels(masks)), jax.tree.leaves(kernels(params))):
        assert not np.any(np.asarray(w)[~np.asarray(m)])
        assert np.all(np.asarray(w)[np.asarray(m)] != 0.0)


def test_ste_forward_is_masked_and_gradients_reach_pruned_dense_weights():
    params = mlp_params(5)
    tx = optax.chain(optax.adam(1e-2), S.ste(sparsity=0.75))
    state = tx.init(params)
    x, y = data(3)

    @jax.jit
    def step(params, state):
        masks = optax.tree.get(state, "masks")
        grads = jax.grad(lambda p: loss_fn(S.ste_apply(p, masks), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    params, state, _ = step(params, state)  # step 0 computes the masks
    masks = optax.tree.get(state, "masks")
    assert [int(m.sum()) for m in jax.tree.leaves(kernels(masks))] == [32, 64, 16]
    np.testing.assert_array_equal(
        forward(S.ste_apply(params, masks), x),
        forward(jaxprune.apply_masks(params, masks), x))
    before = params
    params, state, grads = step(params, state)
    for m, g, w0, w1 in zip(*(jax.tree.leaves(kernels(t)) for t in
                              (masks, grads, before, params))):
        off = ~np.asarray(m)
        assert np.any(np.asarray(g)[off] != 0.0), "no gradient at pruned weights"
        assert np.any(np.asarray(w1)[off] != np.asarray(w0)[off]), "pruned weights frozen"
        assert np.all(np.asarray(w1)[off] != 0.0), "STE must keep dense weights"


def test_ste_supports_n_of_m_masks():
    params = mlp_params(6)
    tx = S.ste(sparsity=0.5, granularity="n_of_m", n=2, m=4, axis=0)
    state = tx.init(params)
    updates, state = tx.update(params, state, params)
    assert updates is params
    m = jaxprune.masks_of(state)["Dense_0"]["kernel"]
    assert np.all(np.asarray(m).reshape(2, 4, 16).sum(1) == 2)


def test_ste_apply_names_mismatched_leaf():
    with pytest.raises(ValueError, match="Dense_1"):
        S.ste_apply(mlp_params(), {"Dense_0": {"kernel": None, "bias": None}})


@pytest.mark.parametrize("kwargs, match", [
    (dict(end=0), "end"),
    (dict(end=10, every=0), "every"),
    (dict(end=10, drop_fraction=1.5), "drop_fraction"),
])
def test_rigl_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.rigl(optax.sgd(0.1), 0.5, **kwargs)


def test_rigl_works_under_optax_multisteps_and_jit_of_init():
    params = mlp_params(7)
    tx = optax.MultiSteps(S.rigl(optax.sgd(0.1), 0.5, every=1, end=100), every_k_schedule=2)
    state = jax.jit(tx.init)(params)
    step = make_step(tx)
    x, y = data(4)
    for _ in range(6):
        params, state = step(params, state, x, y)
    masks = jaxprune.masks_of(state)
    assert [int(m.sum()) for m in jax.tree.leaves(kernels(masks))] == \
        erk_active_counts(params, 0.5)
    for m, w in zip(jax.tree.leaves(kernels(masks)), jax.tree.leaves(kernels(params))):
        assert not np.any(np.asarray(w)[~np.asarray(m)])


def test_random_masks_follow_a_per_path_mapping_and_where():
    params = mlp_params(8)
    masks = S.random_masks(params, None, jax.random.key(0),
                           distribution={"Dense_0": 0.25, ".*": 0.5}, where="kernel$")
    counts = {k: (None if v["kernel"] is None else int(v["kernel"].sum()))
              for k, v in masks.items()}
    assert counts == {"Dense_0": 96, "Dense_1": 128, "Dense_2": 32}
    assert all(v["bias"] is None for v in masks.values())


@pytest.mark.slow
def test_rigl_on_digits_at_90_percent_trains_well_and_beats_static_masks():
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = jnp.asarray(digits.data[order] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[order], jnp.int32)
    cut = int(0.8 * len(y))
    steps = 400
    batches = jnp.asarray(np.random.default_rng(1).integers(0, cut, (steps, 64)))

    def accuracy_after_training(tx):
        def step(i, carry):
            params, state = carry
            xb, yb = x[batches[i]], y[batches[i]]
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                forward_relu(p, xb), yb).mean())(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params = mlp_params(0, (64, 64, 10))
        params, state = jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, (p, tx.init(p))))(
            params)
        masks = jaxprune.masks_of(state)
        assert [int(m.sum()) for m in jax.tree.leaves(kernels(masks))] == \
            erk_active_counts(params, 0.9)
        logits = forward_relu(params, x[cut:])
        return float(jnp.mean(jnp.argmax(logits, -1) == y[cut:]))

    rigl = accuracy_after_training(S.rigl(optax.adam(3e-3), 0.9, every=25, end=300))
    static = accuracy_after_training(S.static_sparse(optax.adam(3e-3), 0.9))
    # Evci et al. 2020: RigL-ERK beats static ERK masks at the same sparsity.
    assert rigl > 0.9 and rigl > static, (rigl, static)


def forward_relu(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


_SHAPES = {"a": (4, 4), "b": (2, 8), "c": (4, 4), "stack": (4, 3, 4), "d": (4, 4)}


@settings(max_examples=8, deadline=None)
@given(st.data(), st.floats(0.0, 1.0, width=32))
def test_grouped_drop_and_grow_equals_each_leaf_and_layer_alone(data, fraction):
    # Leaves of equal shape are stacked and updated by one lax.map; a leaf with a
    # layer axis (here axis 1 of "stack") joins as rows. Every leaf and every layer
    # slice must get exactly the update it gets alone (leaf order, no mixing).
    def draw(shape, elements):
        return np.array(data.draw(st.lists(elements, min_size=int(np.prod(shape)),
                                           max_size=int(np.prod(shape)))),
                        ).reshape(shape)
    masks = {k: draw(s, st.booleans()) for k, s in _SHAPES.items()}
    drop = {k: draw(s, small).astype(np.float32) for k, s in _SHAPES.items()}
    grow = {k: draw(s, small).astype(np.float32) for k, s in _SHAPES.items()}
    masks["skipped"], drop["skipped"], grow["skipped"] = None, np.ones(3, np.float32), np.ones(3, np.float32)
    got = _jit_grouped(masks, drop, grow, jnp.float32(fraction))
    assert got["skipped"] is None
    for k in _SHAPES:
        if k == "stack":
            for j in range(_SHAPES[k][1]):
                expect = _reference_drop_and_grow(masks[k][:, j], drop[k][:, j], grow[k][:, j],
                                                  fraction)
                np.testing.assert_array_equal(np.asarray(got[k][:, j]).ravel(), expect)
        else:
            np.testing.assert_array_equal(
                np.asarray(got[k]).ravel(),
                _reference_drop_and_grow(masks[k], drop[k], grow[k], fraction))


_jit_grouped = jax.jit(lambda m, d, g, f: S._grouped_drop_and_grow(m, d, g, f, {"stack": 1}))
