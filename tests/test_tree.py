"""Leaf paths and where= selectors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxprune import tree


def test_paths_are_slash_joined_for_dicts_lists_and_nnx_state():
    params = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}, "layers": [jnp.ones(2)]}
    assert tree.paths(params) == ["layers/0", "params/Dense_0/kernel"]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs)])

    state = nnx.state(Net(nnx.Rngs(0)))
    assert tree.paths(state) == ["layers/0/bias", "layers/0/kernel"]


def test_default_selector_takes_floating_leaves_of_rank_two_or_more():
    t = {"k": jnp.ones((2, 2)), "b": jnp.ones(2), "i": jnp.ones((2, 2), jnp.int32),
         "h": jnp.ones((2, 2), jnp.bfloat16)}
    assert tree.select(t) == [False, True, False, True]


def test_default_selector_leaves_out_attention_biases_and_norm_scales_of_any_rank():
    # Flax attention biases are (heads, head_dim); a scanned LayerNorm's scale is (layers, d).
    from flax import linen as nn
    x = jnp.ones((1, 3, 8))
    mha = nn.MultiHeadDotProductAttention(num_heads=2).init(jax.random.key(0), x, x)
    picked = [p for p, c in zip(tree.paths(mha), tree.select(mha)) if c]
    assert picked == [f"params/{n}/kernel" for n in ("key", "out", "query", "value")]
    stacked = {"ln": {"scale": jnp.ones((4, 8))}, "w": jnp.ones((4, 8)), "k": jnp.ones((4, 8, 8))}
    assert tree.select(stacked) == [True, False, True]  # k, ln/scale, w (sorted keys)
    # With a layer axis, a (layers, d) leaf is d-vectors: left out like a bias.
    assert tree.select(stacked, layer_axis=0) == [True, False, False]
    assert tree.select(stacked, layer_axis={"^k$": 0}) == [True, False, True]
    assert tree.select(stacked, where="w", layer_axis=0) == [False, False, True]  # explicit wins


def test_regex_callable_and_bool_tree_selectors():
    t = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "b": jnp.ones((3, 3))}
    assert tree.select(t, "bias") == [True, False, False]
    assert tree.select(t, lambda p, x: x.size == 9) == [False, False, True]
    assert tree.select(t, {"a": {"kernel": True, "bias": False}, "b": True}) == [False, True, True]
    assert tree.select(t, {"a": True, "b": False}) == [True, True, False]  # a prefix tree


def test_bad_selectors_raise_clear_errors():
    t = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="selects no leaf"):
        tree.select(t, "nothing")
    with pytest.raises(ValueError, match="regular expression"):
        tree.select(t, "(")
    with pytest.raises(TypeError, match="non-bool leaf"):
        tree.select(t, {"w": 1.0})
    with pytest.raises(ValueError, match="structure"):
        tree.select(t, {"v": True})


def test_structure_mismatch_names_first_path():
    with pytest.raises(ValueError, match="'b'"):
        tree.check_same_structure({"a": 1, "b": 2}, {"a": 1}, "params", "grads")
    with pytest.raises(ValueError, match="shape at 'a'"):
        tree.check_same_structure({"a": jnp.ones(2)}, {"a": jnp.ones(3)}, "params", "grads")


def test_custom_pytree_nodes_are_addressed():
    from typing import NamedTuple

    class Pair(NamedTuple):
        w: jax.Array
        b: jax.Array

    assert tree.paths((Pair(jnp.ones((2, 2)), jnp.ones(2)),)) == ["0/w", "0/b"]
