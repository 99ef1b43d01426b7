"""jaxprune.report.flops / sparse_flops / weighted_ops / latency, against
hand-computed figures on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from jaxprune import report


def _with_density(shape, keep, seed=0):
    """Random nonzero weights with exactly ``keep`` entries kept (the rest 0)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.permutation(flat.size)[keep:]] = 0.0
    return jnp.asarray(w)


def _conv(x, k, stride=1, padding="SAME", lhs_dil=1, rhs_dil=1, groups=1):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), padding, lhs_dilation=(lhs_dil, lhs_dil),
        rhs_dilation=(rhs_dil, rhs_dil), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)


def test_flops_of_a_dense_layer_is_two_per_multiply_add_plus_the_bias_adds():
    layer = nn.Dense(16)
    x = jnp.ones((4, 8))
    variables = layer.init(jax.random.key(0), x)
    assert report.flops(layer.apply, variables, x) == 2 * 4 * 8 * 16 + 4 * 16


def test_flops_of_a_same_conv_leaves_out_taps_on_padding():
    # 5x5 input, 3x3 kernel, SAME: per spatial dim, the 5 outputs see 2+3+3+3+2 = 13
    # real taps, so 13 * 13 positions x 2 in x 4 out multiply-adds.
    k, x = jnp.ones((3, 3, 2, 4)), jnp.ones((1, 5, 5, 2))
    assert report.flops(lambda k, x: _conv(x, k), k, x) == 2 * 13 * 13 * 2 * 4


def test_sparse_flops_scales_each_matmul_by_the_density_of_its_weight():
    variables = {"w1": _with_density((8, 16), keep=32), "w2": _with_density((16, 2), keep=16)}
    f = lambda v, x: jax.nn.relu(x @ v["w1"]) @ v["w2"]
    x = jnp.ones((4, 8))
    # 2*4*8*16 FLOPs at density 32/128, then 2*4*16*2 at density 16/32.
    assert report.sparse_flops(f, variables, x) == 2 * 4 * 8 * 16 / 4 + 2 * 4 * 16 * 2 / 2
    ops = report.weighted_ops(f, variables, x)
    assert [(op.weight, op.flops, op.density) for op in ops] == [
        ("w1", 1024.0, 0.25), ("w2", 256.0, 0.5)]


@pytest.mark.parametrize("stride, padding, lhs_dil, rhs_dil, groups", [
    (1, "SAME", 1, 1, 1), (2, "VALID", 1, 1, 1), (2, [(1, 2), (0, 1)], 2, 1, 1),
    (1, [(2, 0), (1, 1)], 1, 2, 1), (3, "SAME", 1, 3, 1), (1, "SAME", 1, 1, 2)])
def test_dense_conv_count_equals_xla_for_strides_padding_dilation_and_groups(
        stride, padding, lhs_dil, rhs_dil, groups):
    k = jnp.ones((3, 3, 4 // groups, 4))
    x = jnp.ones((2, 9, 7, 4))
    f = lambda v, x: _conv(x, v["k"], stride, padding, lhs_dil, rhs_dil, groups)
    assert report.sparse_flops(f, {"k": k}, x) == report.flops(f, {"k": k}, x)


def test_weight_density_is_read_after_casts_transposes_masks_and_inside_jit():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8)), jnp.float32)  # dense
    mask = jnp.zeros((6, 8), bool).at[:, :2].set(True)                           # keeps 1/4

    @jax.jit
    def masked_t(w, m):
        return jnp.where(m, w, 0.0).T.astype(jnp.bfloat16)

    f = lambda v, x: x.astype(jnp.bfloat16) @ masked_t(v["w"], v["m"])
    x = jnp.ones((3, 8))
    (op,) = report.weighted_ops(f, {"w": w, "m": mask}, x)
    assert op.density == 0.25 and op.flops == 2 * 3 * 8 * 6
    assert op.weight is None  # the operand mixes two leaves (w and m)


def test_products_of_two_activations_count_dense_and_a_reused_weight_counts_twice():
    w = _with_density((4, 4), keep=4)  # density 1/4
    def attention_like(v, x):
        q = x @ v["w"]
        scores = q @ q.T      # activation x activation
        return scores @ (x @ v["w"])  # w used a second time
    x = jnp.ones((5, 4))
    ops = report.weighted_ops(attention_like, {"w": w}, x)
    assert [op.density for op in ops] == [0.25, 1.0, 0.25, 1.0]
    expected = 2 * 5 * 4 * 4 * 0.25 + 2 * 5 * 4 * 5 + 2 * 5 * 4 * 4 * 0.25 + 2 * 5 * 5 * 4
    assert report.sparse_flops(attention_like, {"w": w}, x) == expected


def test_scan_over_stacked_layers_counts_every_layer_at_its_own_density():
    stack = jnp.stack([_with_density((4, 4), keep=k, seed=k) for k in (16, 8, 4)])
    def f(v, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, v["stack"])[0]
    x = jnp.ones((2, 4))
    assert report.sparse_flops(f, {"stack": stack}, x) == 2 * 2 * 4 * 4 * (1 + 0.5 + 0.25)

    shared = {"w": _with_density((4, 4), keep=8)}  # same weight every step: length x one
    g = lambda v, x: jax.lax.scan(lambda h, _: (jnp.tanh(h @ v["w"]), None), x, None, length=5)[0]
    assert report.sparse_flops(g, shared, x) == 5 * 2 * 2 * 4 * 4 * 0.5


def test_loops_and_input_dependent_branches_around_matmuls_are_refused_by_name():
    v = {"w": jnp.ones((4, 4))}
    x = jnp.ones((2, 4))
    loop = lambda v, x: jax.lax.while_loop(lambda h: h.sum() < 100.0, lambda h: h @ v["w"], x)
    with pytest.raises(ValueError, match="'while'"):
        report.sparse_flops(loop, v, x)
    branch = lambda v, x: jax.lax.cond(x.sum() > 0, lambda h: h @ v["w"], lambda h: h, x)
    with pytest.raises(ValueError, match="'cond'"):
        report.sparse_flops(branch, v, x)
    # A branch decided by the weights alone is followed.
    by_weights = lambda v, x: jax.lax.cond(v["w"].sum() > 0, lambda h: h @ v["w"], lambda h: h, x)
    assert report.sparse_flops(by_weights, v, x) == 2 * 2 * 4 * 4


def test_sparse_flops_of_a_linen_cnn_after_masking_matches_the_hand_count():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model, x = CNN(), jnp.ones((2, 6, 6, 1))
    variables = model.init(jax.random.key(0), x)
    params = dict(variables["params"])
    params["Conv_0"] = {**params["Conv_0"], "kernel": _with_density((3, 3, 1, 4), keep=9)}
    params["Dense_0"] = {**params["Dense_0"], "kernel": _with_density((144, 3), keep=108)}
    variables = {**variables, "params": params}
    # conv: 6x6 SAME, 3x3 taps -> (2+3*4+2)^2 = 16^2 real taps per image; dense: 144 -> 3.
    conv, dense = 2 * 2 * 16 * 16 * 1 * 4, 2 * 2 * 144 * 3
    assert report.sparse_flops(model.apply, variables, x) == conv * 0.25 + dense * 0.25
    assert [op.weight for op in report.weighted_ops(model.apply, variables, x)] == [
        "params/Conv_0/kernel", "params/Dense_0/kernel"]


def test_latency_compiles_once_warms_up_and_reports_median_min_max_of_the_timed_runs():
    runs, traces = [], []

    def fn(x):
        traces.append(1)
        io_callback(lambda: runs.append(1) or np.int32(0), jax.ShapeDtypeStruct((), np.int32))
        return x * 2

    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three runs of 1, 3 and 2 seconds
    t = report.latency(fn, jnp.ones(3), repeats=3, warmup=2, clock=lambda: next(ticks))
    assert (t.median, t.min, t.max, t.times) == (2.0, 1.0, 3.0, (1.0, 3.0, 2.0))
    assert len(traces) == 1 and len(runs) == 5


def test_latency_measures_real_time_of_a_blocking_call():
    import time
    def slow(x):
        io_callback(lambda: time.sleep(0.02) or np.int32(0), jax.ShapeDtypeStruct((), np.int32))
        return x + 1
    t = report.latency(slow, jnp.ones(2), repeats=3, warmup=1)
    assert t.min >= 0.02


def test_latency_rejects_a_bad_repeat_count():
    with pytest.raises(ValueError, match="repeats"):
        report.latency(lambda x: x, jnp.ones(2), repeats=0)
