"""Per-leaf sparsity allocation."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxprune import allocation

shapes = st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=5)


@given(shapes, st.floats(0.0, 1.0))
def test_erk_keeps_the_requested_total_and_stays_in_range(shape_list, s):
    out = allocation.erk(s, shape_list)
    sizes = np.array([np.prod(x) for x in shape_list])
    kept = sum((1 - a) * n for a, n in zip(out, sizes))
    assert all(0.0 <= a <= 1.0 for a in out)
    assert kept == pytest.approx((1 - s) * sizes.sum(), rel=1e-6, abs=1e-6) or min(out) == 0.0


def test_erk_densifies_layers_that_would_exceed_density_one():
    out = allocation.erk(0.5, [(1000, 1000), (3, 3)])
    assert out[1] == 0.0 and out[0] > 0.5


def test_check_sparsity_rejects_bad_values():
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError):
            allocation.check_sparsity(bad)
    with pytest.raises(TypeError):
        allocation.check_sparsity(True)
    with pytest.raises(ValueError, match="distribution"):
        allocation.allocate(0.5, "triangular", ["w"], [(2, 2)])


def test_traced_erk_matches_static_erk():
    import jax
    import jax.numpy as jnp
    shape_list = [(100, 100), (100, 10), (3, 3)]
    static = allocation.erk(0.8, shape_list)
    traced = jax.jit(lambda s: jnp.stack(allocation.erk(s, shape_list)))(jnp.float32(0.8))
    np.testing.assert_allclose(np.asarray(traced), static, atol=1e-5)
