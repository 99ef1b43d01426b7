"""Version-robust access to the parameters of equations that hold sub-jaxprs.

JAX changes how control-flow primitives store their parameters between
releases (jax 0.12 replaced ``scan``'s ``num_consts``/``num_carry`` with a
flat-tree ``ft_in`` and stores open ``Jaxpr`` objects with their consts where older
releases stored ``ClosedJaxpr`` objects). Every reader of those parameters goes
through this module, so a new layout is fixed in one place; a layout it does
not know is a ``StructuredPruningError`` naming the primitive and the jax
version, never a ``KeyError``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax

from jaxprune.structured.trace import StructuredPruningError, parameter_error

__all__ = ["Sub", "ScanLayout", "WhileLayout", "ShardMapLayout", "sub", "call", "scan",
           "while_loop", "cond_branches", "shard_map", "CALL_PARAMS"]

#: Call-like primitives (inlined by the tracer) and the parameter holding their body.
CALL_PARAMS = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
}


class Sub(NamedTuple):
    """An open jaxpr and the values of its constvars."""

    jaxpr: Any
    consts: Sequence[Any]


class ScanLayout(NamedTuple):
    """``scan`` operands: ``num_consts`` consts, ``num_carry`` carries, then xs."""

    body: Sub
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: Any


class WhileLayout(NamedTuple):
    """``while`` operands: cond consts, body consts, then the carry."""

    cond: Sub
    body: Sub
    cond_nconsts: int
    body_nconsts: int


class ShardMapLayout(NamedTuple):
    """A ``shard_map``: its body (at per-device shapes), mesh and specs.

    ``in_specs``/``out_specs`` hold one ``PartitionSpec`` per operand/result;
    ``manual_axes`` are the mesh axes the body is manual over.
    """

    body: Sub
    mesh: Any
    in_specs: tuple
    out_specs: tuple
    manual_axes: frozenset
    check_vma: bool


def layout_error(eqn: Any, what: str) -> StructuredPruningError:
    name = eqn.primitive.name
    return StructuredPruningError(
        f"jax {jax.__version__}: unknown parameter layout of primitive '{name}' ({what}; "
        f"parameters: {', '.join(sorted(eqn.params))}). jaxprune reads sub-jaxpr parameters "
        "in jaxprune/structured/jaxpr_params.py; please report this jax version.")


def sub(value: Any) -> Sub:
    """A ``ClosedJaxpr`` (jax <= 0.10) or an open ``Jaxpr`` carrying its own
    consts (jax 0.12) as ``Sub(jaxpr, consts)``."""
    if isinstance(value, Sub):
        return value
    inner = value.jaxpr if type(value).__name__ == "ClosedJaxpr" else value
    if not hasattr(inner, "eqns"):
        raise StructuredPruningError(
            f"jax {jax.__version__}: expected a jaxpr, got {type(value).__name__}")
    return Sub(inner, list(getattr(value, "consts", None) or []))


def _param(eqn: Any, name: str) -> Any:
    try:
        return eqn.params[name]
    except KeyError:
        raise parameter_error(eqn, name) from None


def call(eqn: Any) -> Sub:
    """The body of a call-like primitive (``jit``, ``custom_jvp_call``, ``remat``, ...)."""
    name = CALL_PARAMS.get(eqn.primitive.name)
    if name is None:
        raise layout_error(eqn, "not a call-like primitive")
    return sub(_param(eqn, name))


def scan(eqn: Any) -> ScanLayout:
    """How a ``scan`` equation splits its operands, on every supported jax."""
    p = eqn.params
    body = sub(_param(eqn, "jaxpr"))
    if "num_consts" in p and "num_carry" in p:  # jax <= 0.10
        nc, nk = p["num_consts"], p["num_carry"]
    elif "ft_in" in p:  # jax 0.12: a flat tree (consts, carry, xs)
        try:
            consts, carry, _ = p["ft_in"].unpack()
            nc, nk = len(consts), len(carry)
        except (AttributeError, TypeError, ValueError) as e:
            raise layout_error(eqn, f"cannot unpack ft_in: {e}") from None
    else:
        raise layout_error(eqn, "no num_consts/num_carry or ft_in")
    if nc + nk > len(eqn.invars) or len(body.jaxpr.invars) != len(eqn.invars):
        raise layout_error(eqn, "operand counts do not match the body")
    return ScanLayout(body, nc, nk, _param(eqn, "length"), bool(p.get("reverse", False)),
                      p.get("unroll", 1))


def while_loop(eqn: Any) -> WhileLayout:
    """How a ``while`` equation splits its operands."""
    return WhileLayout(sub(_param(eqn, "cond_jaxpr")), sub(_param(eqn, "body_jaxpr")),
                       _param(eqn, "cond_nconsts"), _param(eqn, "body_nconsts"))


def cond_branches(eqn: Any) -> list[Sub]:
    """The branches of a ``cond`` (operand 0 is the branch index)."""
    return [sub(b) for b in _param(eqn, "branches")]


def _spec_of_names(names: Any, rank: int) -> Any:
    """``{dim: mesh axes}`` (the layout before ``in_specs``) as a ``PartitionSpec``."""
    entries = []
    for d in range(rank):
        axes = tuple(names.get(d, ()))
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return jax.sharding.PartitionSpec(*entries)


def shard_map(eqn: Any) -> ShardMapLayout:
    """How a ``shard_map`` equation maps global operands to its per-device body."""
    p = eqn.params
    body = sub(_param(eqn, "jaxpr"))
    mesh = _param(eqn, "mesh")
    if "in_specs" in p and "out_specs" in p:  # jax 0.10 and 0.12
        ins, outs = tuple(p["in_specs"]), tuple(p["out_specs"])
    elif "in_names" in p and "out_names" in p:  # older releases
        ins = tuple(_spec_of_names(n, len(v.aval.shape)) for n, v in zip(p["in_names"], eqn.invars))
        outs = tuple(_spec_of_names(n, len(v.aval.shape)) for n, v in zip(p["out_names"], eqn.outvars))
    else:
        raise layout_error(eqn, "no in_specs/out_specs or in_names/out_names")
    if len(ins) != len(eqn.invars) or len(outs) != len(eqn.outvars):
        raise layout_error(eqn, "spec counts do not match the operands")
    manual = p.get("newly_manual_axes")
    if manual is None:
        manual = frozenset(mesh.axis_names) - frozenset(p.get("auto", ()))
    return ShardMapLayout(body, mesh, ins, outs, frozenset(manual),
                          bool(p.get("check_vma", p.get("check_rep", True))))


def spec_dims(spec: Any, rank: int) -> set[int]:
    """Dimensions a ``PartitionSpec`` shards (split over some mesh axis)."""
    entries = tuple(spec) if spec is not None else ()
    return {d for d, e in enumerate(entries[:rank]) if e is not None and e != ()}
