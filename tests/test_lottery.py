"""Lottery tickets: IMP rounds, nesting, rewinding and a digits ticket (jaxprune.lottery)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jaxprune
from helpers import mlp_apply, mlp_init
from jaxprune import lottery as L
from jaxprune import sparse_training


def mlp_params(seed=0, sizes=(64, 64, 10)):
    return mlp_init(seed, sizes)


forward = mlp_apply


def mask_leaves(masks):
    return [m for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None) if m is not None]


def kept(masks):
    return sum(int(m.sum()) for m in mask_leaves(masks))


@pytest.mark.parametrize("scope", ["global", "local"])
def test_imp_rounds_reach_one_minus_one_minus_p_to_the_r_exactly(scope):
    params = mlp_params(0, (16, 32, 8))  # 512 + 256 kernel weights: halving is exact
    out = L.imp(lambda p, m: p, params, rounds=4, fraction=0.5, scope=scope)
    total = 16 * 32 + 32 * 8
    for r, rnd in enumerate(out, start=1):
        assert float(jaxprune.sparsity(rnd.masks)) == 1 - 0.5 ** r
        assert kept(rnd.masks) == total // 2 ** r
        if scope == "local":
            assert [int(m.sum()) for m in mask_leaves(rnd.masks)] == [512 >> r, 256 >> r]


@given(fraction=st.floats(0.0, 1.0), rounds=st.integers(1, 4), seed=st.integers(0, 3),
       scope=st.sampled_from(["global", "local"]))
def test_prune_round_counts_are_exact_and_masks_nest(fraction, rounds, seed, scope):
    params = mlp_params(seed, (8, 6, 4))
    masks = None
    remaining = [48, 24]
    for _ in range(rounds):
        trained = jax.tree.map(lambda w: w + 0.1 * jnp.sin(w * 7.0), params)  # "training"
        new = _jit_prune_round(trained, masks, jnp.float32(fraction), scope=scope)
        f64 = np.float64(np.float32(fraction))
        if scope == "global":
            n_prune = int(np.round(f64 * sum(remaining)))
            assert kept(new) == sum(remaining) - n_prune
        else:
            remaining = [r - int(np.round(f64 * r)) for r in remaining]
            assert [int(m.sum()) for m in mask_leaves(new)] == remaining
        # Nesting: nothing pruned before comes back.
        if masks is not None:
            for a, b in zip(mask_leaves(new), mask_leaves(masks)):
                assert not np.any(np.asarray(a) & ~np.asarray(b))
        # The newly pruned are the smallest |w| among the remaining.
        old = mask_leaves(masks) if masks is not None else [np.ones(m.shape, bool)
                                                             for m in mask_leaves(new)]
        ws = [np.abs(np.asarray(trained[k]["kernel"])) for k in ("Dense_0", "Dense_1")]
        groups = zip(ws, old, mask_leaves(new))
        if scope == "global":
            groups = [(np.concatenate([w.ravel() for w in ws]),
                       np.concatenate([np.asarray(o).ravel() for o in old]),
                       np.concatenate([np.asarray(n).ravel() for n in mask_leaves(new)]))]
        for w, o, n in groups:
            o, n = np.asarray(o), np.asarray(n)
            gone, stay = w[o & ~n], w[n]
            if gone.size and stay.size:
                assert gone.max() <= stay.min()
        remaining = [int(m.sum()) for m in mask_leaves(new)]
        masks, params = new, trained


_jit_prune_round = jax.jit(L.prune_round, static_argnames=("scope", "where"))


def test_rewind_restores_survivors_exactly_and_zeros_the_rest():
    init = mlp_params(1)
    early = L.snapshot(init)
    trained = jax.tree.map(lambda w: 3.0 * w + 1.0, init)
    masks = L.prune_round(trained, None, 0.6)
    ticket = L.rewind(early, masks)
    for name in ("Dense_0", "Dense_1"):
        m = np.asarray(masks[name]["kernel"])
        t, e = np.asarray(ticket[name]["kernel"]), np.asarray(init[name]["kernel"])
        np.testing.assert_array_equal(t[m], e[m])
        assert np.all(t[~m] == 0.0)
        assert masks[name]["bias"] is None
        np.testing.assert_array_equal(ticket[name]["bias"], init[name]["bias"])


def test_snapshot_is_an_independent_copy():
    params = {"w": jnp.arange(4.0)}
    early = L.snapshot(params)
    assert early["w"] is not params["w"]
    assert early["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
    np.testing.assert_array_equal(early["w"], params["w"])


def test_imp_rewinds_to_given_step_k_weights():
    init = mlp_params(2, (8, 8, 4))
    step_k = L.snapshot(jax.tree.map(lambda w: w + 0.5, init))
    seen = []

    def train(p, m):
        seen.append(p)
        return jax.tree.map(lambda w: 2.0 * w, p)

    out = L.imp(train, init, rounds=2, fraction=0.5, rewind_params=step_k)
    assert seen[0] is init
    np.testing.assert_array_equal(
        seen[1]["Dense_0"]["kernel"],
        jnp.where(out[0].masks["Dense_0"]["kernel"], step_k["Dense_0"]["kernel"], 0.0))
    assert out[0].ticket is seen[1]


def test_prune_round_rejects_bad_input():
    params = mlp_params(0, (4, 4, 2))
    with pytest.raises(ValueError, match="fraction"):
        L.prune_round(params, None, 1.5)
    with pytest.raises(ValueError, match="scope"):
        L.prune_round(params, None, 0.5, scope="layer")
    with pytest.raises(ValueError, match="Dense_1"):
        L.prune_round(params, {"Dense_0": {"kernel": jnp.ones((4, 4), bool), "bias": None}}, 0.5)


def _digits():
    return jaxprune.data.digits()


@pytest.mark.slow
def test_digits_lottery_ticket_after_two_imp_rounds_trains_to_high_accuracy():
    (x, y), (x_test, y_test) = _digits()
    steps, batch = 300, 64
    batches = np.random.default_rng(1).integers(0, len(x), (steps, batch))
    x, y, batches = jnp.asarray(x), jnp.asarray(y), jnp.asarray(batches)

    @jax.jit
    def train(params, masks):
        tx = sparse_training.fixed_masks(optax.adam(3e-3), masks)

        def step(i, carry):
            params, state = carry
            xb, yb = x[batches[i]], y[batches[i]]
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                forward(p, xb), yb).mean())(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]

    def accuracy(params):
        return float(jnp.mean(jnp.argmax(forward(params, x_test), -1) == y_test))

    init = mlp_params(0)
    rounds = L.imp(train, init, rounds=2, fraction=0.5)
    assert accuracy(rounds[0].trained) > 0.9  # the dense network
    ticket, masks = rounds[-1].ticket, rounds[-1].masks
    assert float(jaxprune.sparsity(masks)) == 0.75
    trained = train(ticket, masks)
    assert float(jaxprune.sparsity({k: v["kernel"] for k, v in trained.items()})) == 0.75
    assert accuracy(trained) > 0.9
