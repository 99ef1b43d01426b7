"""Sub-jaxpr parameters are read the same way on every supported jax (0.10 and 0.12 lay out
``scan`` differently), and an unknown layout is an error naming the primitive and jax version."""

import types

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured.rules import TRACE_RULES
from jaxprune.structured.trace import StructuredPruningError, Tracer


def _eqn(fn, *args, name):
    jaxpr = jp.sub(jax.make_jaxpr(fn)(*args)).jaxpr
    return next(e for e in jaxpr.eqns if e.primitive.name == name)


def test_scan_layout_counts_consts_carry_and_xs():
    def f(c, xs, w):
        def body(carry, x):
            h, n = carry
            return (jnp.tanh(h @ w + x), n + 1.0), h.sum()
        return lax.scan(body, (c, 0.0), xs, reverse=True)

    eqn = _eqn(f, jnp.ones(3), jnp.ones((5, 3)), jnp.ones((3, 3)), name="scan")
    lay = jp.scan(eqn)
    n_xs = len(eqn.invars) - lay.num_consts - lay.num_carry
    assert n_xs == 1 and lay.length == 5 and lay.reverse
    assert len(lay.body.jaxpr.invars) == len(eqn.invars)
    # The carry part of the body's outputs matches the carried operands' avals.
    carried = eqn.invars[lay.num_consts:lay.num_consts + lay.num_carry]
    outs = lay.body.jaxpr.outvars[:lay.num_carry]
    assert [v.aval.shape for v in carried] == [v.aval.shape for v in outs]
    assert lay.num_carry >= 1 and (3,) in [v.aval.shape for v in carried]


def test_while_cond_and_call_layouts():
    w = _eqn(lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * x), (0, x)),
             2.0, name="while")
    lay = jp.while_loop(w)
    assert len(w.invars) == lay.cond_nconsts + lay.body_nconsts + 2
    c = _eqn(lambda p, x: lax.cond(p, lambda x: x + 1, lambda x: x * 2, x), True, 1.0, name="cond")
    assert len(jp.cond_branches(c)) == 2
    j = _eqn(lambda x: jax.jit(jnp.sin)(x), 1.0, name=jax.make_jaxpr(jax.jit(jnp.sin))(1.0)
             .eqns[0].primitive.name)
    assert [e.primitive.name for e in jp.call(j).jaxpr.eqns] == ["sin"]


def _fake(name, **params):
    return types.SimpleNamespace(primitive=types.SimpleNamespace(name=name), params=params,
                                 invars=[], outvars=[])


def test_unknown_scan_layout_names_primitive_and_jax_version():
    with pytest.raises(StructuredPruningError, match=r"jax .*'scan'") as err:
        jp.scan(_fake("scan", jaxpr=jp.sub(jax.make_jaxpr(jnp.sin)(1.0)).jaxpr, length=2))
    assert jax.__version__ in str(err.value)
    with pytest.raises(StructuredPruningError, match="'while'.*cond_jaxpr"):
        jp.while_loop(_fake("while", body_jaxpr=None))


def test_renamed_parameter_of_a_ruled_primitive_is_not_a_key_error():
    eqn = _eqn(lambda a: jnp.transpose(a), jnp.ones((2, 3)), name="transpose")
    renamed = types.SimpleNamespace(primitive=eqn.primitive, invars=eqn.invars,
                                    outvars=eqn.outvars, params={"perm": (1, 0)})
    jaxpr = types.SimpleNamespace(eqns=[renamed])
    with pytest.raises(StructuredPruningError, match=r"'transpose' has no parameter 'permutation'"):
        Tracer(TRACE_RULES).walk(jaxpr, ())
