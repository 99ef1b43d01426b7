"""Leaves grouped by size and stacked flattened (one device, see
``jaxprune.leaf_groups``) must give exactly the masks of the grouping by
shape (several devices): same counts, same ties, same leaf order."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import leaf_groups

# Equal sizes in different shapes (48: four shapes; 15: two), ties and a NaN.
SHAPES = {"a": (6, 8), "b": (8, 6), "c": (2, 4, 6), "d": (3, 5), "e": (4, 2, 6), "f": (5, 3),
          "g": (6, 8)}


def _params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    # Rounded to a few values: many ties at every threshold.
    p = {n: jnp.round(jax.random.normal(k, s) * 2) / 2 for (n, s), k in zip(SHAPES.items(), keys)}
    p["c"] = p["c"].at[1, 2, 3].set(jnp.nan)
    p["f"] = p["f"] * 1e-3  # the global guard must hold it
    return p


def _kept(params):
    keys = jax.random.split(jax.random.key(1), len(params))
    return {n: jax.random.bernoulli(k, 0.8, x.shape) for (n, x), k in zip(params.items(), keys)}


def _both(monkeypatch, fn):
    """``fn()`` grouped by shape, then by size; both results as NumPy."""
    out = []
    for flatten in (False, True):
        monkeypatch.setattr(leaf_groups, "_FLATTEN", flatten)
        jax.clear_caches()  # jitted helpers were traced under the other grouping
        out.append(jax.tree.map(np.asarray, fn()))
    return out


def test_groups_are_by_size_when_flattened(monkeypatch):
    xs = list(_params().values())
    monkeypatch.setattr(leaf_groups, "_FLATTEN", False)
    assert leaf_groups.group_indices(xs) == [[0, 6], [1], [2], [3], [4], [5]]
    monkeypatch.setattr(leaf_groups, "_FLATTEN", True)
    assert leaf_groups.group_indices(xs) == [[0, 1, 2, 4, 6], [3, 5]]
    parts = [leaf_groups.stack(xs, g) for g in leaf_groups.group_indices(xs)]
    assert [p.shape for p in parts] == [(5, 48), (2, 15)]
    back = leaf_groups.unstack(parts, leaf_groups.group_indices(xs), len(xs), like=xs)
    for x, y in zip(xs, back):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="like="):
        leaf_groups.unstack(parts, leaf_groups.group_indices(xs), len(xs))
    # A stack of layers (rows) joins the leaves of its row size, its rows contiguous.
    xs.append(jnp.arange(3 * 48, dtype=jnp.float32).reshape(3, 8, 6))
    rows = [False] * (len(xs) - 1) + [True]
    groups = leaf_groups.group_indices(xs, rows=rows)
    assert groups == [[0, 1, 2, 4, 6, 7], [3, 5]]
    part = leaf_groups.stack(xs, groups[0], rows)
    assert part.shape == (8, 48)
    np.testing.assert_array_equal(np.asarray(part[5:]), np.asarray(xs[7]).reshape(3, 48))
    back = leaf_groups.unstack([part, leaf_groups.stack(xs, groups[1], rows)], groups, len(xs),
                               rows, like=xs)
    for x, y in zip(xs, back):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kw", [
    dict(scope="local", distribution="erk"), dict(scope="global"),
    pytest.param(dict(scope="local"), marks=pytest.mark.slow),
    pytest.param(dict(scope="global", normalize="lamp"), marks=pytest.mark.slow)])
def test_mask_functions_give_the_masks_of_the_shape_grouping(monkeypatch, kw):
    params = _params()
    scores = jaxprune.scores.magnitude(params)
    by_shape, by_size = _both(monkeypatch, lambda: jax.jit(
        lambda s: jaxprune.masks.unstructured(s, 0.7, **kw))(scores))
    jax.tree.map(np.testing.assert_array_equal, by_shape, by_size)
    pruned = sum(int((~m).sum()) for m in by_size.values())
    if kw["scope"] == "global":
        n = sum(x.size for x in params.values())
        assert pruned == jaxprune.threshold.prune_count(0.7, n)
    else:
        assert pruned > 0


@pytest.mark.slow  # ~40 s: every update compiled under both groupings
def test_transformations_give_the_masks_of_the_shape_grouping(monkeypatch):
    params = _params()
    grads = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape),
                         params)
    txs = {
        "local": lambda: optax.chain(optax.sgd(0.1), jaxprune.prune(  # ERK reads leaf shapes
            sparsity=jaxprune.schedules.polynomial(0.9, begin=0, end=3, every=1),
            distribution="erk")),
        "global": lambda: optax.chain(optax.sgd(0.1), jaxprune.prune(
            sparsity=jaxprune.schedules.constant(0.8, every=1), scope="global")),
        "rigl": lambda: jaxprune.rigl(optax.sgd(0.1), 0.7, every=1, end=10,
                                      distribution="uniform"),
    }

    def run(make):
        tx = make()
        p, state = params, tx.init(params)
        update = jax.jit(tx.update)
        seen = []
        for _ in range(3):
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
            seen.append(jaxprune.masks_of(state))
        return seen

    for name, make in txs.items():
        by_shape, by_size = _both(monkeypatch, lambda: run(make))
        jax.tree.map(np.testing.assert_array_equal, by_shape, by_size)
        assert not by_size[-1]["c"][1, 2, 3] or name == "rigl", name  # the NaN weight went


@pytest.mark.slow
def test_layer_axis_and_kept_masks_give_the_masks_of_the_shape_grouping(monkeypatch):
    params = _params()
    params["stack"] = jnp.round(jax.random.normal(jax.random.key(5), (3, 8, 6)) * 2) / 2
    scores, kept = jaxprune.scores.magnitude(params), _kept(params)
    for kw in (dict(scope="local"), dict(scope="global")):
        fn = jax.jit(lambda s: jaxprune.masks.unstructured(s, 0.6, layer_axis={"stack": 0}, **kw))
        by_shape, by_size = _both(monkeypatch, lambda: fn(scores))
        jax.tree.map(np.testing.assert_array_equal, by_shape, by_size)
    rounds = _both(monkeypatch, lambda: jaxprune.lottery.prune_round(
        params, kept, 0.5, scope="local", layer_axis={"stack": 0}))
    jax.tree.map(np.testing.assert_array_equal, *rounds)
