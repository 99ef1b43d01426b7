"""Every primitive that ``jax.nn``, common ``jax.numpy``/``lax`` ops and the Flax Linen and NNX
layers emit has a coupling rule in ``jaxprune.structured.rules.TRACE_RULES``.

The audit traces each case at small shapes (abstractly; nothing runs) and collects the
primitives of its jaxpr, sub-jaxprs included. Run it as a script to print the table of
primitives and the first case that emits each one::

    PYTHONPATH=$PWD python tests/test_primitive_coverage.py
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.rules import TRACE_RULES

X3 = jax.ShapeDtypeStruct((2, 3, 4), jnp.float32)  # (batch, seq, features)
IMG = jax.ShapeDtypeStruct((2, 6, 6, 4), jnp.float32)
KEY = jax.random.key(0)


def _subjaxprs(eqn: Any) -> Iterator[Any]:
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if hasattr(item, "eqns") or type(item).__name__ == "ClosedJaxpr":
                yield jp.sub(item).jaxpr


def primitives(jaxpr: Any, found: dict | None = None, case: str = "") -> dict[str, str]:
    """``{primitive name: case}`` over ``jaxpr`` and every sub-jaxpr."""
    found = {} if found is None else found
    for eqn in jaxpr.eqns:
        found.setdefault(eqn.primitive.name, case)
        for sub in _subjaxprs(eqn):
            primitives(sub, found, case)
    return found


# ---------------------------------------------------------------- cases
def _jax_nn_cases() -> list[tuple[str, Callable, tuple]]:
    special = {
        "dot_product_attention": (lambda q: jax.nn.dot_product_attention(q, q, q),
                                  (jnp.zeros((2, 3, 2, 4)),)),
        "one_hot": (lambda i: jax.nn.one_hot(i, 5), (jnp.zeros((2, 3), jnp.int32),)),
        "scaled_dot_general": None, "scaled_matmul": None, "get_scaled_dot_general_config": None,
    }
    out = []
    for name in sorted(dir(jax.nn)):
        fn = getattr(jax.nn, name)
        if name.startswith("_") or not callable(fn) or inspect.isclass(fn) or inspect.ismodule(fn):
            continue
        if name in special:
            if special[name] is not None:
                out.append((f"jax.nn.{name}", *special[name]))
            continue
        out.append((f"jax.nn.{name}", fn, (X3,)))
    out.append(("jax.nn.softmax(where=)", lambda a: jax.nn.softmax(a, where=a > 0), (X3,)))
    out.append(("jax.nn.dot_product_attention(mask)", lambda q: jax.nn.dot_product_attention(
        q, q, q, is_causal=True), (jnp.zeros((2, 3, 2, 4)),)))
    return out


_I = jnp.zeros((2, 3), jnp.int32)
_JNP = {
    "sum/mean/var/std": lambda a: a.sum(-1) + a.mean(-1) + a.var(-1) + a.std(-1, keepdims=True)[..., 0],
    "max/min/prod/all/any": lambda a: a.max(1) + a.min(1) + a.prod(1) + (a > 0).all(1) + (a > 0).any(1),
    "argmax/argmin": lambda a: jnp.argmax(a, -1) + jnp.argmin(a, 1).sum(),
    "cumsum/cumprod/cummax": lambda a: jnp.cumsum(a, 1) + jnp.cumprod(a, 1) + lax.cummax(a, 1)
    + lax.cummin(a, 1) + lax.cumlogsumexp(a, 1),
    "sort/argsort/top_k": lambda a: jnp.sort(a, -1) + jnp.argsort(a, -1) + lax.top_k(a, 4)[0],
    "take/take_along_axis": lambda a: jnp.take(a, jnp.array([2, 0]), axis=1).sum()
    + jnp.take_along_axis(a, jnp.argsort(a, -1), -1),
    "index/slice": lambda a: a[:, 0] + a[:, 1:2, 0] + a[:, ::2].sum(1) + a[:, jnp.array([1, 2])].sum(1),
    "stack/unstack/tile/repeat": lambda a: jnp.stack([a, a], 1).sum(1) + jnp.tile(a, (1, 1, 2))[..., :4]
    + jnp.repeat(a, 2, axis=1)[:, :3] + sum(jnp.unstack(a, axis=1))[:, None],
    "concatenate/split": lambda a: jnp.concatenate(jnp.split(a, 2, axis=-1)[::-1], -1),
    "pad/roll/flip": lambda a: jnp.pad(a, ((0, 0), (1, 1), (0, 0)))[:, 1:-1] + jnp.roll(a, 1, 1)
    + jnp.flip(a, 1),
    "reshape/transpose/swapaxes": lambda a: a.reshape(2, 12).reshape(2, 3, 4).transpose(0, 2, 1)
    .swapaxes(1, 2)
    + jnp.moveaxis(a, 0, 0) + jnp.squeeze(jnp.expand_dims(a, 0), 0),
    "einsum/matmul/tensordot": lambda a: jnp.einsum("bsd,bte->bsde", a, a).sum(-1) + a @ jnp.ones((4, 4))
    + jnp.tensordot(a, jnp.ones((4, 4)), 1),
    "where/clip/nan_to_num": lambda a: jnp.where(a > 0, a, 0.0) + jnp.clip(a, -1, 1) + jnp.nan_to_num(a)
    + jnp.round(a) + jnp.sign(a) + jnp.power(jnp.abs(a), 1.5) + jnp.isnan(a) + jnp.logaddexp(a, a),
    "tril/triu/eye/arange": lambda a: jnp.tril(a) + jnp.triu(a) + jnp.eye(3, 4) + jnp.arange(4.0)
    + jnp.linspace(0, 1, 4),
    "norm/logsumexp": lambda a: jnp.linalg.norm(a, axis=-1) + jax.scipy.special.logsumexp(a, -1),
    "at[].set/add/max": lambda a: a.at[:, 0].set(1.0).at[:, 1].add(2.0).at[:, 2].max(0.0).at[:, 0].mul(2.0),
    "dynamic_slice/update": lambda a: lax.dynamic_update_slice(a, lax.dynamic_slice(a, (0, 1, 0), (2, 1, 4)),
                                                               (0, 0, 0)),
    "integer ops": lambda a: (a.astype(jnp.int32) >> 1) + (a.astype(jnp.int32) % 3)
    + lax.population_count(a.astype(jnp.uint32)).astype(jnp.float32)
    + jnp.floor_divide(a, 2) + lax.clz(a.astype(jnp.int32)),
    "special fns": lambda a: jax.scipy.special.erf(a) + jax.scipy.special.gammaln(jnp.abs(a) + 1)
    + jax.scipy.special.digamma(jnp.abs(a) + 1) + lax.erf_inv(jnp.tanh(a)) + jnp.cbrt(a) + jnp.arctan2(a, a),
    "complex/fft": lambda a: jnp.fft.rfft(a, axis=-1).real.sum() + jnp.abs(jnp.fft.fft(a, axis=1)).sum(),
    "searchsorted/bincount": lambda a: jnp.searchsorted(jnp.arange(4.0), a).astype(jnp.float32)
    + jnp.bincount(jnp.zeros(5, jnp.int32), length=4),
    "conv (jnp.convolve)": lambda a: jnp.convolve(a[0, 0], jnp.ones(3), mode="same"),
    "random": lambda a: a * jax.random.bernoulli(KEY, 0.5, a.shape) + jax.random.normal(KEY, a.shape)
    + jax.random.uniform(jax.random.fold_in(KEY, 1), a.shape) + jax.random.permutation(KEY, 4)
    + jax.random.categorical(jax.random.split(KEY)[0], a).sum(),
    "scan/while/cond/fori": lambda a: lax.scan(lambda c, r: (c + r, c * r), a[:, 0], a.swapaxes(0, 1))[0]
    + lax.fori_loop(0, 2, lambda i, c: c * 2, a[:, 0]) + lax.cond(True, jnp.sin, jnp.cos, a[:, 0])
    + lax.while_loop(lambda c: c.sum() < 0, lambda c: c + 1, a[:, 0]),
    "map/vmap axis_name": lambda a: lax.map(jnp.sin, a) + jax.vmap(
        lambda r: r - lax.pmean(r, "b") + lax.pmax(r, "b") + lax.axis_index("b"), axis_name="b")(a),
    "remat/custom_jvp/custom_vjp": lambda a: jax.checkpoint(jax.nn.relu)(a) + jax.nn.softplus(a)
    + jax.numpy.linalg.norm(a, axis=-1, keepdims=True),
    "reduce_precision/bitcast": lambda a: lax.reduce_precision(a, 5, 10) + lax.bitcast_convert_type(
        lax.bitcast_convert_type(a, jnp.int32), jnp.float32),
    "optimization_barrier/debug": lambda a: lax.optimization_barrier(a) * 2,
    "nextafter/rem": lambda a: lax.nextafter(a, a + 1) + lax.rem(a, 2.0),
}


def _jnp_cases() -> list[tuple[str, Callable, tuple]]:
    return [(f"jnp {name}", fn, (X3,)) for name, fn in _JNP.items()]


def _collective_cases() -> list[tuple[str, Callable, tuple]]:
    n = len(jax.devices())
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    P = jax.sharding.PartitionSpec

    def body(a):
        s = lax.psum(a, "d") + lax.pmean(a, "d") + lax.pmax(a, "d") + lax.pmin(a, "d")
        s = s + lax.ppermute(a, "d", [(i, (i + 1) % n) for i in range(n)])
        g = lax.all_gather(a, "d", axis=0, tiled=True)
        s = s + g[: a.shape[0]] + lax.axis_index("d").astype(a.dtype)
        s = s + lax.psum_scatter(jnp.tile(a, (n, 1, 1)), "d", scatter_dimension=0, tiled=True)
        return s + lax.all_to_all(jnp.tile(a, (1, 1, n)), "d", 2, 2, tiled=True)[..., :4]

    smap = jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    pm = jax.pmap(lambda r: r - lax.pmean(r, "b"), axis_name="b")
    return [("shard_map collectives", smap, (jax.ShapeDtypeStruct((2 * n, 3, 4), jnp.float32),)),
            ("pmap pmean", pm, (jax.ShapeDtypeStruct((1, 3, 4), jnp.float32),))]


def _linen_cases() -> list[tuple[str, Callable, tuple]]:
    layers = {
        "Dense": (nn.Dense(5), X3), "DenseGeneral": (nn.DenseGeneral((2, 3), axis=-1), X3),
        "Conv": (nn.Conv(5, (3, 3)), IMG), "ConvGrouped": (nn.Conv(4, (3, 3), feature_group_count=2), IMG),
        "ConvTranspose": (nn.ConvTranspose(5, (3, 3), strides=(2, 2)), IMG),
        "ConvLocal": (nn.ConvLocal(3, (3, 3)), IMG),
        "Embed": (nn.Embed(7, 4), jax.ShapeDtypeStruct((2, 3), jnp.int32)),
        "LayerNorm": (nn.LayerNorm(), X3), "RMSNorm": (nn.RMSNorm(), X3),
        "GroupNorm": (nn.GroupNorm(2), IMG), "InstanceNorm": (nn.InstanceNorm(), IMG),
        "BatchNorm(eval)": (nn.BatchNorm(use_running_average=True), IMG),
        "WeightNorm": (nn.WeightNorm(nn.Dense(5)), X3), "SpectralNorm": None,
        "MHA": (nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4), X3),
        "Dropout": None, "LSTMCell-RNN": (nn.RNN(nn.LSTMCell(5)), X3),
        "GRUCell-RNN": (nn.RNN(nn.GRUCell(5)), X3), "Einsum": (nn.Einsum((4, 5), "bsd,de->bse"), X3),
        "PReLU": (nn.PReLU(), X3),
    }
    out = []
    for name, spec in layers.items():
        if spec is None:
            continue
        layer, x = spec
        variables = jax.eval_shape(layer.init, KEY, x)
        out.append((f"linen.{name}", layer.apply, (variables, x)))

    class Train(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=False)(x)
            h = nn.Dropout(0.5, deterministic=False)(h)
            pooled = nn.avg_pool(nn.max_pool(h, (2, 2), (2, 2)), (1, 1))
            return pooled + nn.pooling.min_pool(h, (2, 2), (2, 2))

    v = jax.eval_shape(lambda x: Train().init({"params": KEY, "dropout": KEY}, x), IMG)
    out.append(("linen BatchNorm(train)/Dropout/pool", lambda v, x, k: Train().apply(
        v, x, rngs={"dropout": k}, mutable=["batch_stats"]), (v, IMG, KEY)))

    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, axis_name="batch")(x)

    vn = jax.eval_shape(lambda x: Named().init(KEY, x), jax.ShapeDtypeStruct((6, 6, 4), jnp.float32))
    out.append(("linen BatchNorm(axis_name) under vmap", lambda v, x: jax.vmap(
        lambda r: Named().apply(v, r, mutable=["batch_stats"]), axis_name="batch")(x), (vn, IMG)))
    sn = nn.SpectralNorm(nn.Dense(5))
    vs = jax.eval_shape(lambda: sn.init(KEY, jnp.zeros((2, 4)), update_stats=False))
    out.append(("linen.SpectralNorm", lambda v, x: sn.apply(v, x, update_stats=False),
                (vs, jnp.zeros((2, 4)))))
    return out


def _nnx_cases() -> list[tuple[str, Callable, tuple]]:
    r = nnx.Rngs(0)
    layers = {
        "Linear": (lambda: nnx.Linear(4, 5, rngs=r), X3),
        "LinearGeneral": (lambda: nnx.LinearGeneral(4, (2, 3), rngs=r), X3),
        "Conv": (lambda: nnx.Conv(4, 5, (3, 3), rngs=r), IMG),
        "ConvTranspose": (lambda: nnx.ConvTranspose(4, 5, (3, 3), strides=(2, 2), rngs=r), IMG),
        "Embed": (lambda: nnx.Embed(7, 4, rngs=r), jax.ShapeDtypeStruct((2, 3), jnp.int32)),
        "LayerNorm": (lambda: nnx.LayerNorm(4, rngs=r), X3),
        "RMSNorm": (lambda: nnx.RMSNorm(4, rngs=r), X3),
        "GroupNorm": (lambda: nnx.GroupNorm(4, num_groups=2, rngs=r), IMG),
        "BatchNorm(train)": (lambda: nnx.BatchNorm(4, rngs=r), IMG),
        "Dropout": (lambda: nnx.Dropout(0.5, rngs=r), X3),
        "MHA": (lambda: nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=4, decode=False,
                                               rngs=r), X3),
        "LSTM": (lambda: nnx.RNN(nnx.LSTMCell(4, 5, rngs=r)), X3),
    }
    out = []
    for name, (make, x) in layers.items():
        model = make()
        graphdef, state = nnx.split(model)

        def apply(state, x, graphdef=graphdef):
            m = nnx.merge(graphdef, state)
            return m(x), nnx.state(m)
        out.append((f"nnx.{name}", apply, (state, x)))
    return out


def all_cases() -> list[tuple[str, Callable, tuple]]:
    return _jax_nn_cases() + _jnp_cases() + _collective_cases() + _linen_cases() + _nnx_cases()


def audit() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``({primitive: first case}, [(case, trace error)])`` over ``all_cases()``."""
    found: dict[str, str] = {}
    errors = []
    for name, fn, args in all_cases():
        try:
            jaxpr = jp.sub(jax.make_jaxpr(fn)(*args)).jaxpr
        except Exception as e:  # noqa: BLE001 - reported
            errors.append((name, f"{type(e).__name__}: {e}"[:200]))
            continue
        primitives(jaxpr, found, name)
    return found, errors


@pytest.fixture(scope="module")
def audited():
    return audit()


def test_every_audited_case_traces(audited):
    assert audited[1] == []


def test_every_emitted_primitive_has_a_rule(audited):
    found, _ = audited
    missing = {p: case for p, case in found.items() if p not in TRACE_RULES}
    assert missing == {}, f"primitives without a coupling rule: {missing}"
    assert len(found) > 100  # the audit really covers the vocabulary


if __name__ == "__main__":
    found, errors = audit()
    print(f"jax {jax.__version__}: {len(found)} primitives")
    for p in sorted(found):
        print(f"  {'rule ' if p in TRACE_RULES else 'NONE '} {p:28s} {found[p]}")
    for case, err in errors:
        print(f"  trace error in {case}: {err}")
    sys.exit(1 if errors or any(p not in TRACE_RULES for p in found) else 0)
