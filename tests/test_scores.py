"""Score criteria compute their published formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import scores

W = {"w": jnp.array([[2.0, -1.0], [0.5, -3.0]])}
G = {"w": jnp.array([[0.5, 2.0], [-4.0, 1.0]])}


def test_formulas():
    w, g = np.asarray(W["w"]), np.asarray(G["w"])
    np.testing.assert_allclose(scores.magnitude(W)["w"], np.abs(w))
    np.testing.assert_allclose(scores.saliency(W, G)["w"], np.abs(w * g))
    np.testing.assert_allclose(scores.taylor(W, G)["w"], (w * g) ** 2)
    np.testing.assert_allclose(scores.movement(W, G)["w"], -w * g)
    np.testing.assert_allclose(scores.fisher(W, G)["w"], 0.5 * w ** 2 * g)


def test_random_scores_are_reproducible_and_differ_between_leaves():
    p = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
    r1, r2 = scores.random(p, jax.random.key(0)), scores.random(p, jax.random.key(0))
    np.testing.assert_array_equal(r1["a"], r2["a"])
    assert not np.array_equal(r1["a"], r1["b"])


def test_random_scores_are_one_stream_per_leaf_whatever_the_grouping():
    # Leaves of one shape are drawn by one vmapped generator; each must still get
    # exactly the stream of its own key (split in leaf order), as drawn alone.
    p = {"a": jnp.ones((3, 4)), "b": jnp.ones((5,)), "c": jnp.ones((3, 4)), "d": jnp.ones(())}
    key = jax.random.key(3)
    got = jax.tree.leaves(jax.jit(scores.random)(p, key))
    leaves = jax.tree.leaves(p)
    keys = jax.random.split(key, len(leaves))
    for g, k, x in zip(got, keys, leaves):
        np.testing.assert_array_equal(g, jax.random.uniform(k, x.shape, dtype=jnp.float32))


def test_scores_work_under_jit_and_keep_structure():
    out = jax.jit(scores.saliency)(W, G)
    assert jax.tree.structure(out) == jax.tree.structure(W)


def test_mismatched_grads_name_the_path():
    with pytest.raises(ValueError, match="shape at 'w'"):
        scores.saliency(W, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="'v'"):
        scores.taylor(W, {"v": jnp.ones((2, 2))})
