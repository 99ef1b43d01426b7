"""Compute and speed of a (pruned) model: FLOPs from XLA's cost analysis, the
RigL paper's sparse FLOPs from the jaxpr, and measured latency. Public as
``jaxprune.report.flops``, ``sparse_flops``, ``weighted_ops`` and ``latency``."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jaxprune.structured import jaxpr_params as jp
from jaxprune.tree import leaves_with_paths

PyTree = Any

__all__ = ["flops", "sparse_flops", "weighted_ops", "WeightedOp", "latency", "Latency"]

_WEIGHTED = ("dot_general", "conv_general_dilated")


def flops(apply_fn: Callable, *args: Any) -> float:
    """FLOPs of one call of ``jax.jit(apply_fn)(*args)``, from XLA's cost
    analysis of the compiled program (every op: matmuls, convolutions,
    element-wise work; a multiply-add counts 2; convolution taps that fall on
    padding are not counted).

    >>> import jax.numpy as jnp
    >>> flops(lambda w, x: x @ w, jnp.ones((8, 16)), jnp.ones((4, 8)))  # 2*4*8*16
    1024.0
    """
    cost = jax.jit(apply_fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA's cost analysis on {jax.default_backend()!r} reports no 'flops'")
    return float(cost["flops"])


@dataclasses.dataclass(frozen=True)
class WeightedOp:
    """One matmul or convolution of a traced function (see ``weighted_ops``)."""

    primitive: str          # "dot_general" or "conv_general_dilated"
    flops: float            # dense FLOPs (2 per multiply-add)
    density: float          # nonzero fraction of the weight operand; 1.0 if none
    weight: Optional[str]   # leaf path of the weight when it comes from one leaf

    @property
    def sparse_flops(self) -> float:
        return self.flops * self.density


_ACT = object()  # marks a value that depends on the inputs (an activation)


def weighted_ops(apply_fn: Callable, variables: PyTree, *args: Any) -> list[WeightedOp]:
    """Every ``dot_general`` and ``conv_general_dilated`` that
    ``apply_fn(variables, *args)`` runs, with its dense FLOPs and the density
    of the weight it multiplies.

    A *weight* is an operand computed from ``variables`` (and constants) alone,
    through any ops (casts, reshapes, transposes, masks); its density is the
    nonzero fraction of its actual value. An op between two activations
    (attention scores) has density 1; between two weights, the smaller density
    (an upper bound on the nonzero products). Ops inside ``jit``, ``remat``,
    ``custom_jvp``/``custom_vjp`` are followed; a ``scan`` counts every
    iteration (stacked weights slice by slice); a ``cond`` whose branch is
    decided by the inputs, or a ``while`` loop, around a matmul is an error.
    """
    leaves, treedef = jax.tree.flatten((variables, args))
    n_vars = len(jax.tree.leaves(variables))
    paths = [p for p, _ in leaves_with_paths(variables)]

    def flat_fn(*xs):
        v, a = jax.tree.unflatten(treedef, xs)
        return apply_fn(v, *a)

    jaxpr, consts = jp.sub(jax.make_jaxpr(flat_fn)(*leaves))
    inputs: list = [(x, frozenset([p])) for p, x in zip(paths, leaves[:n_vars])]
    inputs += [_ACT] * (len(leaves) - n_vars)
    out: list[WeightedOp] = []
    _walk(jaxpr, consts, inputs, out)
    return out


def sparse_flops(apply_fn: Callable, variables: PyTree, *args: Any) -> float:
    """FLOPs of the matmuls and convolutions of ``apply_fn(variables, *args)``,
    each scaled by the density of its weight: how Evci et al. 2020 ("Rigging
    the Lottery: Making All Tickets Winners", ICML) count the FLOPs of sparse
    networks, i.e. the work a kernel that skips zero weights would do.
    Element-wise ops, normalisation and biases are not counted; padding taps
    are excluded as in ``flops``.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0]])   # 3 of 6 nonzero
    >>> sparse_flops(lambda v, x: x @ v["w"], {"w": w}, jnp.ones((5, 3)))  # 2*5*3*2 * 0.5
    30.0
    """
    return float(sum(op.sparse_flops for op in weighted_ops(apply_fn, variables, *args)))


def _is_literal(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _density(value: Any) -> float:
    arr = np.asarray(value)
    return float(np.count_nonzero(arr)) / arr.size if arr.size else 1.0


def _read(env: dict, v: Any) -> Any:
    if _is_literal(v):
        return (v.val, frozenset())
    return env[v]


def _walk(jaxpr: Any, consts: Sequence[Any], inputs: Sequence[Any], out: list) -> list:
    """Evaluates the weight-only part of ``jaxpr`` concretely; records weighted ops.

    A value is ``_ACT`` (depends on the inputs; only its shape is known) or
    ``(array, source_paths)``.
    """
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = (c, frozenset())
    for v, x in zip(jaxpr.invars, inputs):
        env[v] = x
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [_read(env, v) for v in eqn.invars]
        if name in jp.CALL_PARAMS:
            sub, sub_consts = jp.call(eqn)
            outs = _walk(sub, sub_consts, ins, out)
        elif name == "scan":
            outs = _walk_scan(eqn, ins, out)
        elif name in ("cond", "while"):
            outs = _walk_control(eqn, ins, out)
        else:
            if name in _WEIGHTED:
                out.append(_count(eqn, ins))
            elif any(_has_weighted(j) for j in _sub_jaxprs(eqn)):
                raise ValueError(f"sparse_flops does not follow '{name}', which holds matmuls "
                                 "or convolutions; call it on the function inside instead")
            outs = _evaluate(eqn, ins)
        for v, x in zip(eqn.outvars, outs):
            if type(v).__name__ != "DropVar":
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def _evaluate(eqn: Any, ins: list) -> list:
    """Runs a weight-only equation on its concrete inputs; else marks activations."""
    if any(x is _ACT for x in ins):
        return [_ACT] * len(eqn.outvars)
    result = eqn.primitive.bind(*[x[0] for x in ins], **eqn.params)
    result = result if eqn.primitive.multiple_results else [result]
    sources = frozenset().union(*[x[1] for x in ins]) if ins else frozenset()
    return [(r, sources) for r in result]


def _count(eqn: Any, ins: list) -> WeightedOp:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        macs = math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
    else:
        macs = _conv_macs(eqn.params, lhs.shape, rhs.shape, out.shape)
    weights = [x for x in ins if x is not _ACT]
    density = min((_density(x[0]) for x in weights), default=1.0)
    sources = frozenset().union(*[x[1] for x in weights]) if weights else frozenset()
    path = next(iter(sources)) if len(sources) == 1 else None
    return WeightedOp(eqn.primitive.name, 2.0 * macs, density, path)


def _conv_macs(params: dict, lhs: tuple, rhs: tuple, out: tuple) -> int:
    """Multiply-adds of a convolution, counting only taps that land on the
    (dilated) input, not on padding -- the count XLA's cost analysis uses."""
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    taps = 1
    for i in range(len(lhs_spec) - 2):
        n_in, k = lhs[lhs_spec[2 + i]], rhs[rhs_spec[2 + i]]
        n_out = out[out_spec[2 + i]]
        stride = params["window_strides"][i]
        lo = params["padding"][i][0]
        ld = (params.get("lhs_dilation") or (1,) * len(lhs))[i]
        rd = (params.get("rhs_dilation") or (1,) * len(rhs))[i]
        o = np.arange(n_out)[:, None] * stride + np.arange(k)[None, :] * rd - lo
        taps *= int(np.count_nonzero((o >= 0) & (o <= (n_in - 1) * ld) & (o % ld == 0)))
    batch, out_features = out[out_spec[0]], out[out_spec[1]]
    return batch * out_features * rhs[rhs_spec[1]] * taps


def _sub_jaxprs(eqn: Any) -> list:
    found = []
    for p in eqn.params.values():
        for s in (p if isinstance(p, (tuple, list)) else [p]):
            if hasattr(s, "eqns") or hasattr(getattr(s, "jaxpr", None), "eqns"):
                found.append(s)
    return found


def _has_weighted(j: Any) -> bool:
    jaxpr = jp.sub(j).jaxpr
    return any(eqn.primitive.name in _WEIGHTED or any(_has_weighted(s) for s in _sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


def _walk_scan(eqn: Any, ins: list, out: list) -> list:
    lay = jp.scan(eqn)
    body, body_consts = lay.body
    nc, nk = lay.num_consts, lay.num_carry
    if not _has_weighted(body):
        return _evaluate(eqn, ins)
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    carry = [_ACT] * nk  # a carry changes every iteration: treated as an activation
    length = lay.length
    stacked = [x is not _ACT for x in xs]
    if not any(stacked):  # every iteration sees the same weights: count one, scale
        found: list = []
        _walk(body, body_consts, consts + carry + xs, found)
        out.extend(dataclasses.replace(op, flops=op.flops * length) for op in found)
    else:
        for t in range(length):
            xs_t = [(x[0][t], x[1]) if s else _ACT for x, s in zip(xs, stacked)]
            _walk(body, body_consts, consts + carry + xs_t, out)
    return [_ACT] * len(eqn.outvars)


def _walk_control(eqn: Any, ins: list, out: list) -> list:
    name = eqn.primitive.name
    if name == "cond" and ins[0] is not _ACT:
        # The branch is decided by the weights alone: follow the one that runs.
        branches = jp.cond_branches(eqn)
        index = int(np.clip(np.asarray(ins[0][0]), 0, len(branches) - 1))
        sub, sub_consts = branches[index]
        return _walk(sub, sub_consts, ins[1:], out)
    subs = (jp.cond_branches(eqn) if name == "cond"
            else (jp.while_loop(eqn).cond, jp.while_loop(eqn).body))
    if any(_has_weighted(s) for s in subs):
        raise ValueError(
            f"sparse_flops cannot count the matmuls inside '{name}': "
            + ("which branch runs depends on the inputs" if name == "cond"
               else "its trip count is not known before it runs")
            + "; count the branches or the loop body separately")
    return _evaluate(eqn, ins)


@dataclasses.dataclass(frozen=True)
class Latency:
    """Wall-clock seconds per call (see ``latency``)."""

    median: float
    min: float
    max: float
    times: tuple

    def __str__(self) -> str:
        return (f"{self.median * 1e3:.3f} ms (min {self.min * 1e3:.3f}, max {self.max * 1e3:.3f}, "
                f"{len(self.times)} runs)")


def latency(fn: Callable, *args: Any, repeats: int = 20, warmup: int = 2, jit: bool = True,
            clock: Callable[[], float] = time.perf_counter) -> Latency:
    """Measures ``fn(*args)``: compiles once (``jit=True``; an already
    compiled ``jax.jit(f).lower(...).compile()`` is used as is), runs
    ``warmup`` calls, then times ``repeats`` calls, each until its outputs are
    ready (``jax.block_until_ready``).

    Returns a ``Latency`` with ``.median``, ``.min``, ``.max`` and ``.times`` in
    seconds. Compare models by the ratio of medians measured in the same run;
    on a shared machine, interleave short measurements of the models being
    compared (pass compiled functions so that each call does not recompile).

    >>> import jax.numpy as jnp
    >>> t = latency(lambda x: x @ x, jnp.ones((64, 64)), repeats=5)
    >>> t.min <= t.median <= t.max and len(t.times) == 5
    True
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, "
                         f"warmup={warmup}")
    compiled = isinstance(fn, jax.stages.Compiled)
    run = jax.jit(fn).lower(*args).compile() if jit and not compiled else fn
    for _ in range(warmup):
        jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(run(*args))
        times.append(clock() - start)
    return Latency(statistics.median(times), min(times), max(times), tuple(times))
