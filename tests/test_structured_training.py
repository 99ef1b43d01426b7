"""Gradual group pruning inside an optax chain, then shrinking for real."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from helpers import linen_mlp, train_linen
from jaxprune import structured as S


def MLP():
    return linen_mlp((32, 24, 4))


def test_prune_groups_trains_towards_channels_then_shrinks_to_the_same_outputs():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    y = jax.random.normal(jax.random.key(1), (16, 4))
    variables = model.init(jax.random.key(2), x)
    gs = S.groups(model.apply, variables, x)
    assert sorted(g.size for g in gs) == [24, 32]
    schedule = jaxprune.schedules.polynomial(0.5, begin=0, end=20, every=5)
    tx = optax.chain(optax.adam(1e-2), S.prune_groups(gs, schedule))
    params, state = train_linen(model.apply, variables["params"], tx, x, y, 30)
    masks = jaxprune.masks_of(state)
    kept = S.channels_kept(gs, masks)
    assert sorted(len(k) for k in kept) == [12, 16]  # exactly half of every group
    # Pruned channels are whole zero columns of the producing kernel, rows of the next.
    k0 = np.asarray(params["Dense_0"]["kernel"])
    g0 = next(i for i, g in enumerate(gs) if g.size == 32)
    removed = sorted(set(range(32)) - set(kept[g0]))
    assert (k0[:, removed] == 0).all() and (np.asarray(params["Dense_1"]["kernel"])[removed] == 0).all()
    assert (np.asarray(params["Dense_0"]["bias"])[removed] == 0).all()

    trained = {"params": params}
    plan = S.make_plan(trained, gs, kept)
    small, forward = S.shrink(model.apply, trained, plan)
    assert small["params"]["Dense_0"]["kernel"].shape == (8, 16)
    np.testing.assert_allclose(forward(small, x), model.apply(trained, x), rtol=1e-5, atol=1e-5)


def test_global_group_scope_prunes_the_exact_total_and_keeps_min_channels():
    model = MLP()
    x = jnp.ones((2, 8))
    variables = model.init(jax.random.key(3), x)
    gs = S.groups(model.apply, variables, x)
    tx = S.prune_groups(gs, 0.5, scope="global", min_channels=4)
    params = variables["params"]
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    kept = S.channels_kept(gs, jaxprune.masks_of(state))
    assert sum(len(k) for k in kept) == 56 - 28
    assert min(len(k) for k in kept) >= 4
