"""jaxprune.calibrate: input statistics found in the jaxpr equal hand-computed ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.calibration import from_matrix, to_matrix
from jaxprune.layer_order import analyze_layers
from jaxprune.calibration import trace
from jaxprune.weight_sites import SiteError
from tests.helpers import mlp_apply, mlp_init


def _close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


def test_two_layer_mlp_statistics_equal_hand_computed():
    params = mlp_init(0, [5, 6, 3])
    xs = [jax.random.normal(jax.random.key(i), (n, 5)) for i, n in ((1, 7), (2, 4))]
    stats = jaxprune.calibrate(mlp_apply, params, xs)
    assert set(stats) == {"Dense_0/kernel", "Dense_1/kernel"}  # biases are not matmul weights
    x = np.concatenate([np.asarray(b, np.float64) for b in xs])
    h = np.maximum(x @ np.asarray(params["Dense_0"]["kernel"], np.float64), 0.0)
    for path, inp in (("Dense_0/kernel", x), ("Dense_1/kernel", h)):
        s = stats[path]
        _close(s.sq_norm, (inp ** 2).sum(0))
        _close(s.gram, inp.T @ inp)
        assert float(s.count) == 11.0 and s.in_axes == (0,) and s.group_axes == ()
        assert s.sq_norm.dtype == jnp.float32


def test_convolution_statistics_are_those_of_its_patches():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), strides=2, use_bias=False)(x)

    net = Net()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    v = {"params": {"Conv_0": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 3, 4))}}}
    s = jaxprune.calibrate(net.apply, v, [x])["params/Conv_0/kernel"]
    # Hand patches: SAME padding, stride 2 on 6 -> 3 outputs, pads (0, 1).
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
    patches = np.array([xp[n, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1)
                        for n in range(2) for i in range(3) for j in range(3)])
    assert s.in_axes == (0, 1, 2)  # (kh, kw, cin) are the kernel's input features
    _close(s.gram, patches.T @ patches)
    _close(s.sq_norm, (patches ** 2).sum(0))
    assert float(s.count) == 18.0
    kernel = v["params"]["Conv_0"]["kernel"]
    w = to_matrix(kernel, s)  # (cout, kh*kw*cin): columns in the same order as the patches
    _close(patches @ np.asarray(w).T, np.asarray(net.apply(v, x)).reshape(-1, 4))
    np.testing.assert_array_equal(from_matrix(w, kernel.shape, s), kernel)


def test_views_through_transpose_reshape_cast_jit_remat_and_custom_jvp():
    @jax.custom_jvp
    def proj(x, w):
        return x @ w

    proj.defjvp(lambda p, t: (proj(*p), t[0] @ p[1] + p[0] @ t[1]))

    def f(v, x):
        h = jax.jit(lambda a, w: a @ w.astype(jnp.bfloat16).astype(jnp.float32).T)(x, v["t"])
        h = jax.checkpoint(lambda a: jnp.tanh(a @ v["heads"].reshape(6, 6)))(h)  # (in, h, hd)
        h = h.reshape(-1, 2, 3)
        return proj(h.reshape(-1, 6), v["out"].reshape(6, 2))  # (h, hd, out)

    ks = jax.random.split(jax.random.key(0), 4)
    v = {"t": jax.random.normal(ks[0], (6, 4)), "heads": jax.random.normal(ks[1], (6, 2, 3)),
         "out": jax.random.normal(ks[2], (2, 3, 2))}
    x = jax.random.normal(ks[3], (9, 4))
    s = jaxprune.calibrate(f, v, [x])
    assert (s["t"].in_axes, s["heads"].in_axes, s["out"].in_axes) == ((1,), (0,), (0, 1))
    x64 = np.asarray(x, np.float64)
    t = np.asarray(v["t"].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    h1 = x64 @ t.T
    h2 = np.tanh(h1 @ np.asarray(v["heads"], np.float64).reshape(6, 6))
    for path, inp in (("t", x64), ("heads", h1), ("out", h2)):
        _close(s[path].gram, inp.T @ inp)


def test_scanned_stack_gets_per_layer_statistics():
    w = jax.random.normal(jax.random.key(0), (3, 5, 5)) / 2

    def f(v, x):  # layer l computes tanh(x @ W[l].T): inputs are W's axis 2
        return jax.lax.scan(lambda c, wl: (jnp.tanh(c @ wl.T), None), x, v["W"])[0]

    x = jax.random.normal(jax.random.key(1), (8, 5))
    s = jaxprune.calibrate(f, {"W": w}, [x])["W"]
    assert (s.in_axes, s.group_axes, s.sq_norm.shape, s.gram.shape) == ((2,), (0,), (3, 5), (3, 5, 5))
    c = np.asarray(x, np.float64)
    for layer in range(3):
        _close(s.gram[layer], c.T @ c)
        c = np.tanh(c @ np.asarray(w[layer], np.float64).T)


def test_dot_batch_axis_gives_statistics_per_head():
    w = jax.random.normal(jax.random.key(0), (2, 4, 3))  # (heads, in, out)
    f = lambda v, x: jnp.einsum("bhi,hio->bho", x, v["w"])
    x = jax.random.normal(jax.random.key(1), (5, 2, 4))
    s = jaxprune.calibrate(f, {"w": w}, [x])["w"]
    assert (s.in_axes, s.group_axes, s.gram.shape) == ((1,), (0,), (2, 4, 4))
    for head in range(2):
        xh = np.asarray(x[:, head], np.float64)
        _close(s.gram[head], xh.T @ xh)


def test_bf16_model_statistics_are_float32():
    params = mlp_init(0, [8, 16, 4], dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (32, 8)).astype(jnp.bfloat16)
    s = jaxprune.calibrate(mlp_apply, params, [x], gram=False)["Dense_1/kernel"]
    assert s.sq_norm.dtype == jnp.float32 and s.gram is None
    h = np.asarray(jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]), np.float64)
    _close(s.sq_norm, (h ** 2).sum(0), tol=1e-5)


def test_layer_stages_of_a_transformer_block():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
            h = nn.Dense(32)(nn.LayerNorm()(x))
            return x + nn.Dense(8)(nn.gelu(h))

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Block()(x)  # Linen numbers modules in construction order
            return Block()(x)

    x = jnp.ones((1, 4, 8))
    v = jax.eval_shape(Two().init, jax.random.key(0), x)  # shapes are all the analysis needs
    items = jaxprune.tree.leaves_with_paths(v)
    closed = trace(Two().apply, v, (x,), "batches[0]")
    layers = analyze_layers(closed, [p for p, _ in items], [np.shape(a) for _, a in items],
                            jaxprune.tree.select(v, r"kernel$"))
    names = [sorted(items[k][0].split("/", 2)[2].rsplit("/", 1)[0] for k, _ in stage)
             for stage in layers.stages()]
    mha = "MultiHeadDotProductAttention_0/"
    block = [[mha + "key", mha + "query", mha + "value"], [mha + "out"], ["Dense_0"], ["Dense_1"]]
    assert names == block + block  # q/k/v, then o, then the MLP's up and down, per block
    assert [items[k][0].split("/")[1] for k, _ in layers.stages()[4]] == ["Block_1"] * 3


def test_bad_input_errors_name_the_argument_or_leaf():
    params = mlp_init(0, [5, 6, 3])
    x = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"batches\[1\].*\(4, 7\)"):
        jaxprune.calibrate(mlp_apply, params, [x, jnp.ones((4, 7))])
    with pytest.raises(SiteError, match="'Dense_0/bias'.*no dot_general"):
        jaxprune.calibrate(mlp_apply, params, [x], where="Dense_0")
    with pytest.raises(ValueError, match="batches is empty"):
        jaxprune.calibrate(mlp_apply, params, [])
    mixed = lambda v, x: x @ v["w"].reshape(6, 4)  # the reshape mixes input and output features
    with pytest.raises(SiteError, match="'w'.*mixes input and output"):
        jaxprune.calibrate(mixed, {"w": jnp.ones((4, 6))}, [jnp.ones((2, 6))])
    looped = lambda v, x: jax.lax.cond(x.sum() > 0, lambda a: a @ v["w"], lambda a: a, x)
    with pytest.raises(SiteError, match="'w'.*inside `cond`"):
        jaxprune.calibrate(looped, {"w": jnp.ones((3, 3))}, [jnp.ones((2, 3))])
