"""One coupling rule per jaxpr primitive (the registry ``TRACE_RULES``).

A rule receives the tracer, the equation, the scope of the equation's own
variables and the scope for its sub-jaxprs. It unites the axes that carry the
same channel index and freezes axes whose index cannot be followed (strided
slices, padded axes, sorted axes, argmax positions, ...). Axes indexed by
position are not channels: the positions a slice drops and the rows a gather
reads at data-dependent positions are frozen; a gather at *constant* positions
(``h[:, perm]``, ``x[:, [0, 2]]``) and ``rev`` record which channel lands where
(a ``take`` structure), so pruning maps through the permutation. Every
primitive that ``jax.nn``, ``jax.numpy`` and the Flax Linen/NNX layers emit on
jax 0.10 and 0.12 has a rule (``tests/test_primitive_coverage.py`` audits it).
A primitive with no rule goes to the equivariance check of ``equivariance.py``;
axes it cannot couple make the analysis raise, naming the primitive and its
equation, if they would be pruned. Gather, scatter and ``rev`` live in
``indexing.py``; rules for primitives that hold sub-jaxprs
(``jit``, ``custom_jvp_call``, ``scan``, ``cond``, ``while``, ...) live in
``control.py``; collectives and ``shard_map`` in ``collectives.py``.
"""

from __future__ import annotations

from typing import Any

from jaxprune.structured import collectives, control, equivariance, indexing
from jaxprune.structured.trace import Tracer

__all__ = ["TRACE_RULES", "ELEMENTWISE"]

#: Primitives whose operands and result share every axis (one index map).
ELEMENTWISE = frozenset("""
add sub mul div rem pow max min atan2 nextafter and or xor not eq ne lt le gt ge
select_n clamp neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh
logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt
square integer_pow abs erf erfc erf_inv lgamma digamma convert_element_type
stop_gradient copy copy_p reduce_precision real imag conj shift_left
shift_right_logical shift_right_arithmetic population_count clz add_any
sharding_constraint mesh_cast polygamma igamma igammac bessel_i0e bessel_i1e
le_to lt_to random_gamma_grad zeta regularized_incomplete_beta
""".split())

REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor".split())


def _elementwise(t: Tracer, eqn: Any, scope: tuple, sub: tuple) -> None:
    outs = eqn.outvars
    out_shape = t.shape(outs[0])
    out_axes = t.axes(outs[0], scope)
    for o in outs[1:]:
        t.unite_vars(outs[0], scope, o, scope)
    for v in eqn.invars:
        shape = t.shape(v)
        if len(shape) != len(out_shape):
            continue  # scalars
        for ax, (n, m) in enumerate(zip(shape, out_shape)):
            if n == m:
                t.uf.union(t.axes(v, scope)[ax], out_axes[ax])


def _broadcast_in_dim(t, eqn, scope, sub):
    (x, *_), (out,) = eqn.invars, eqn.outvars
    xs, os_ = t.shape(x), t.shape(out)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if xs[i] == os_[d]:
            t.uf.union(t.axes(x, scope)[i], t.axes(out, scope)[d])


def _reshape(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    if eqn.params.get("dimensions") is not None:
        t.freeze_var(x, scope, "reshape with dimensions")
        t.freeze_var(out, scope, "reshape with dimensions")
        return
    xs, os_ = t.shape(x), t.shape(out)
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    i = j = 0
    while i < len(xs) or j < len(os_):
        # Take the smallest runs of input / output axes with equal products.
        i0, j0 = i, j
        pi = pj = 1
        if i < len(xs):
            pi *= xs[i]; i += 1
        if j < len(os_):
            pj *= os_[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(xs):
                pi *= xs[i]; i += 1
            elif j < len(os_):
                pj *= os_[j]; j += 1
            else:
                break
        ins, outs = xa[i0:i], oa[j0:j]
        if len(ins) == 1:
            t.uf.set_struct(ins[0], "prod", outs) if len(outs) > 1 else t.uf.union(ins[0], outs[0])
        elif len(outs) == 1:
            t.uf.set_struct(outs[0], "prod", ins)
        else:
            big_in = [n for n in ins if t.uf.size[n] > 1]
            big_out = [n for n in outs if t.uf.size[n] > 1]
            if len(big_in) <= 1 or len(big_out) <= 1:
                # Only size-1 axes on one side besides one axis: a product.
                if len(big_in) == 1:
                    t.uf.set_struct(big_in[0], "prod", big_out)
                elif len(big_out) == 1:
                    t.uf.set_struct(big_out[0], "prod", big_in)
            elif [t.uf.size[n] for n in big_in] == [t.uf.size[n] for n in big_out]:
                for p, q in zip(big_in, big_out):
                    t.uf.union(p, q)
            else:
                for n in ins + outs:
                    t.uf.freeze(n, "reshape regroups axes in a way that is not a split or merge")


def _squeeze(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    dims = {d % len(t.shape(x)) for d in eqn.params["dimensions"]}
    kept = [a for k, a in enumerate(t.axes(x, scope)) if k not in dims]
    for p, q in zip(kept, t.axes(out, scope)):
        t.uf.union(p, q)


def _expand_dims(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    dims = set(eqn.params["dimensions"])
    kept = [a for k, a in enumerate(t.axes(out, scope)) if k not in dims]
    for p, q in zip(t.axes(x, scope), kept):
        t.uf.union(p, q)


def _transpose(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    for i, p in enumerate(eqn.params["permutation"]):
        t.uf.union(oa[i], xa[p])


def _reduce(t, eqn, scope, sub):
    x = eqn.invars[0]
    axes = {a % max(len(t.shape(x)), 1) for a in eqn.params["axes"]}
    kept = [a for k, a in enumerate(t.axes(x, scope)) if k not in axes]
    for out in eqn.outvars:
        for p, q in zip(kept, t.axes(out, scope)):
            t.uf.union(p, q)


def _arg_reduce(t, eqn, scope, sub):
    """``argmax``/``argmin``: the result is a position along the reduced axis,
    which would index the kept channels only: that axis is not prunable."""
    _reduce(t, eqn, scope, sub)
    x = eqn.invars[0]
    for a in eqn.params["axes"]:
        t.uf.freeze(t.axes(x, scope)[a % len(t.shape(x))],
                    f"'{eqn.primitive.name}' returns positions along this axis")


def _along_axis_frozen(param: str):
    def rule(t, eqn, scope, sub):
        _elementwise(t, eqn, scope, sub)
        ax = eqn.params[param]
        for v in list(eqn.invars) + list(eqn.outvars):
            if t.shape(v):
                t.uf.freeze(t.axes(v, scope)[ax % len(t.shape(v))],
                            f"'{eqn.primitive.name}' mixes indices along this axis")
    return rule


def _dot_general(t, eqn, scope, sub):
    lhs, rhs = eqn.invars[:2]
    out = eqn.outvars[0]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    la, ra, oa = t.axes(lhs, scope), t.axes(rhs, scope), t.axes(out, scope)
    for p, q in zip(lc, rc):
        t.uf.union(la[p], ra[q])
    k = 0
    for p, q in zip(lb, rb):
        t.uf.union(la[p], ra[q])
        t.uf.union(la[p], oa[k])
        k += 1
    for p in range(len(la)):
        if p not in lc and p not in lb:
            t.uf.union(la[p], oa[k]); k += 1
    for q in range(len(ra)):
        if q not in rc and q not in rb:
            t.uf.union(ra[q], oa[k]); k += 1


def _conv(t, eqn, scope, sub):
    lhs, rhs = eqn.invars[:2]
    out = eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    la, ra, oa = t.axes(lhs, scope), t.axes(rhs, scope), t.axes(out, scope)
    if eqn.params.get("batch_group_count", 1) != 1:
        for n in la + ra + oa:
            t.uf.freeze(n, "conv with batch_group_count")
        return
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    t.uf.union(la[lspec[0]], oa[ospec[0]])
    for s in list(lspec[2:]):
        t.uf.freeze(la[s], "conv spatial axis")
    for s in list(rspec[2:]):
        t.uf.freeze(ra[s], "conv spatial axis")
    for s in list(ospec[2:]):
        t.uf.freeze(oa[s], "conv spatial axis")
    g = eqn.params.get("feature_group_count", 1)
    lf, rin, rout, of = la[lspec[1]], ra[rspec[1]], ra[rspec[0]], oa[ospec[1]]
    t.uf.union(rout, of)
    if g == 1:
        t.uf.union(lf, rin)
        return
    # Grouped conv: input features = groups x per-group inputs, kernel outputs =
    # groups x per-group outputs; the group index is one atom on both sides.
    groups = t.uf.new(g)
    t.uf.set_struct(lf, "prod", [groups, rin])
    per_out = t.uf.new(t.uf.size[rout] // g)
    t.uf.set_struct(rout, "prod", [groups, per_out])


def _parts_along(t, whole, parts, axis, scope):
    """``whole`` is ``parts`` laid end to end along ``axis``: every other axis
    is shared, and ``axis`` is the sum of the parts' axes."""
    wa = t.axes(whole, scope)
    for v in parts:
        for k, a in enumerate(t.axes(v, scope)):
            if k != axis:
                t.uf.union(a, wa[k])
    t.uf.set_struct(wa[axis], "sum", [t.axes(v, scope)[axis] for v in parts])


def _concatenate(t, eqn, scope, sub):
    _parts_along(t, eqn.outvars[0], eqn.invars, eqn.params["dimension"], scope)


def _split(t, eqn, scope, sub):
    _parts_along(t, eqn.invars[0], eqn.outvars, eqn.params["axis"], scope)


def _slice(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    xs = t.shape(x)
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    strides = eqn.params["strides"] or (1,) * len(xs)
    for k, (a, b, s) in enumerate(zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides)):
        if (a, b, s) == (0, xs[k], 1):
            t.uf.union(xa[k], oa[k])
        elif s == 1:
            # The positions the slice leaves out are not channels (unless some
            # other slice reads them; see groups.analyze).
            pre, post = t.uf.new(a), t.uf.new(xs[k] - b)
            t.uf.dropped += [pre, post]
            t.uf.set_struct(xa[k], "sum", [pre, oa[k], post])
        else:
            t.uf.freeze(xa[k], "strided slice")
            t.uf.freeze(oa[k], "strided slice")


def _pad(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    for k, cfg in enumerate(eqn.params["padding_config"]):
        if tuple(cfg) == (0, 0, 0):
            t.uf.union(xa[k], oa[k])
        else:
            t.uf.freeze(xa[k], "padded axis")
            t.uf.freeze(oa[k], "padded axis")


def _dynamic_slice(t, eqn, scope, sub):
    x, out = eqn.invars[0], eqn.outvars[0]
    xs = t.shape(x)
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    for k, n in enumerate(eqn.params["slice_sizes"]):
        if n == xs[k]:
            t.uf.union(xa[k], oa[k])
        else:
            t.uf.freeze(xa[k], "dynamically sliced axis")
            t.uf.freeze(oa[k], "dynamically sliced axis")


def _dynamic_update_slice(t, eqn, scope, sub):
    x, upd = eqn.invars[:2]
    out = eqn.outvars[0]
    xs, us = t.shape(x), t.shape(upd)
    xa, ua, oa = t.axes(x, scope), t.axes(upd, scope), t.axes(out, scope)
    for k in range(len(xs)):
        t.uf.union(xa[k], oa[k])
        if xs[k] == us[k]:
            t.uf.union(xa[k], ua[k])
        else:
            t.uf.freeze(xa[k], "dynamically updated axis")
            t.uf.freeze(ua[k], "dynamically updated axis")


def _stack(t, eqn, scope, sub):
    oa = t.axes(eqn.outvars[0], scope)
    ax = eqn.params["axis"] % len(oa)
    rest = [a for k, a in enumerate(oa) if k != ax]
    for v in eqn.invars:
        for p, q in zip(t.axes(v, scope), rest):
            t.uf.union(p, q)
    t.uf.freeze(oa[ax], "stacked axis (one entry per operand)")


def _unstack(t, eqn, scope, sub):
    xa = t.axes(eqn.invars[0], scope)
    ax = eqn.params["axis"] % len(xa)
    rest = [a for k, a in enumerate(xa) if k != ax]
    for v in eqn.outvars:
        for p, q in zip(rest, t.axes(v, scope)):
            t.uf.union(p, q)
    t.uf.freeze(xa[ax], "unstacked axis (one result per entry)")


def _tile(t, eqn, scope, sub):
    """Output axis = repetitions x input axis (row-major); repetitions stay."""
    x, out = eqn.invars[0], eqn.outvars[0]
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    reps = tuple(eqn.params["reps"])
    if len(xa) != len(oa) or len(reps) != len(xa):
        return _freeze_all("tile that changes rank")(t, eqn, scope, sub)
    for k, r in enumerate(reps):
        if r == 1:
            t.uf.union(xa[k], oa[k])
        else:
            rep = t.uf.new(r)
            t.uf.freeze(rep, "tile repetitions")
            t.uf.set_struct(oa[k], "prod", [rep, xa[k]])


def _top_k(t, eqn, scope, sub):
    x = eqn.invars[0]
    xa = t.axes(x, scope)
    ax = eqn.params.get("axis", -1) % len(xa)
    for o in eqn.outvars:
        oa = t.axes(o, scope)
        for k, (p, q) in enumerate(zip(xa, oa)):
            if k == ax:
                t.uf.freeze(p, "top_k axis"); t.uf.freeze(q, "top_k axis")
            else:
                t.uf.union(p, q)


def _fft(t, eqn, scope, sub):
    """The transformed (last ``len(fft_lengths)``) axes mix; the rest pass through."""
    x, out = eqn.invars[0], eqn.outvars[0]
    xa, oa = t.axes(x, scope), t.axes(out, scope)
    n = len(eqn.params["fft_lengths"])
    for k, (p, q) in enumerate(zip(xa, oa)):
        if k >= len(xa) - n:
            t.uf.freeze(p, "fft axis"); t.uf.freeze(q, "fft axis")
        else:
            t.uf.union(p, q)


def _random_bits(t, eqn, scope, sub):
    # Bits drawn at the full shape; the shrinker cuts them to the kept indices,
    # so a dropout mask matches the one of the masked dense model.
    if t.shape(eqn.invars[0]):
        _freeze_all("batched random keys")(t, eqn, scope, sub)
    t.axes(eqn.outvars[0], scope)


def _bitcast(t, eqn, scope, sub):
    if len(t.shape(eqn.invars[0])) == len(t.shape(eqn.outvars[0])):
        _elementwise(t, eqn, scope, sub)
    else:
        _freeze_all("bitcast between bit widths")(t, eqn, scope, sub)


def _iota(t, eqn, scope, sub):
    t.axes(eqn.outvars[0], scope)  # fresh axes; the shrinker takes kept values


def _freeze_all(reason: str):
    def rule(t, eqn, scope, sub):
        for v in list(eqn.invars) + list(eqn.outvars):
            t.freeze_var(v, scope, f"{reason} ('{eqn.primitive.name}')")
    return rule


def _reduce_window(t, eqn, scope, sub):
    p = eqn.params
    n_in = len(eqn.invars)
    dims, strides = p["window_dimensions"], p["window_strides"]
    pads = p["padding"]
    base = p.get("base_dilation") or (1,) * len(dims)
    wdil = p.get("window_dilation") or (1,) * len(dims)
    for k in range(len(dims)):
        plain = dims[k] == 1 and strides[k] == 1 and tuple(pads[k]) == (0, 0) \
            and base[k] == 1 and wdil[k] == 1
        for v in list(eqn.invars[: n_in]) + list(eqn.outvars):
            if not t.shape(v):
                continue
            if plain:
                t.uf.union(t.axes(v, scope)[k], t.axes(eqn.outvars[0], scope)[k])
            else:
                t.uf.freeze(t.axes(v, scope)[k], "pooling window axis")


def _passthrough(t, eqn, scope, sub):
    for a, b in zip(eqn.invars, eqn.outvars):
        if type(a).__name__ != "Literal":
            t.unite_vars(a, scope, b, scope)


#: Primitive name -> rule that unites the coupled axes of its operands and results.
TRACE_RULES: dict[str, Any] = {name: _elementwise for name in ELEMENTWISE}
TRACE_RULES.update({name: _reduce for name in REDUCTIONS})
TRACE_RULES.update({
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "transpose": _transpose,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "concatenate": _concatenate,
    "split": _split,
    "slice": _slice,
    "pad": _pad,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "iota": _iota,
    "cumsum": _along_axis_frozen("axis"),
    "cumprod": _along_axis_frozen("axis"),
    "cummax": _along_axis_frozen("axis"),
    "cummin": _along_axis_frozen("axis"),
    "cumlogsumexp": _along_axis_frozen("axis"),
    "sort": _along_axis_frozen("dimension"),
    "argmax": _arg_reduce,
    "argmin": _arg_reduce,
    "top_k": _top_k,
    "fft": _fft,
    "stack": _stack,
    "unstack": _unstack,
    "tile": _tile,
    "random_bits": _random_bits,
    "bitcast_convert_type": _bitcast,
    "random_seed": _freeze_all("random numbers"),
    "random_wrap": _freeze_all("random numbers"),
    "random_unwrap": _freeze_all("random numbers"),
    "random_fold_in": _freeze_all("random numbers"),
    "random_split": _freeze_all("random numbers"),
    "threefry2x32": _freeze_all("random numbers"),
    "rng_bit_generator": _freeze_all("random numbers"),
    "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
    "reduce_window_min": _reduce_window,
    "optimization_barrier": _passthrough,
    "device_put": _passthrough,
    "debug_callback": lambda t, eqn, scope, sub: None,  # prints; couples nothing
})
TRACE_RULES.update(indexing.TRACE_INDEXING)
# jax 0.12 "hijax" primitives (``jnp.searchsorted``, ...) wrap an arbitrary
# high-level op: they are black boxes, coupled only along axes where slicing
# commutes with them exactly (the equivariance check).
TRACE_RULES["call_hi_primitive"] = lambda t, eqn, scope, sub: equivariance.couple(t, eqn, scope)
TRACE_RULES.update(control.TRACE_CONTROL)
TRACE_RULES.update(collectives.TRACE_COLLECTIVES)
