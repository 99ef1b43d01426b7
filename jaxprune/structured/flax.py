"""Flax adapters: Linen modules and NNX models that run at the reduced shapes.

The only module of ``jaxprune.structured`` that imports flax. A shrunk Linen
module is a ``ShrunkLinen`` whose ``apply`` reads the reduced variables and runs
the re-emitted jaxpr; a shrunk NNX model is a ``ShrunkNNX`` whose ``nnx.Param`` variables
(and other Variables) have the reduced shapes, so ``nnx.Optimizer`` and
``nnx.grad`` work on it. ``rebuild_nnx`` builds a model fresh from a config
(``nnx.eval_shape`` + ``nnx.merge``) when the user can state the reduced widths.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from jaxprune import tree as jtree
from jaxprune.structured.trace import StructuredPruningError

PyTree = Any

__all__ = ["ShrunkLinen", "ShrunkNNX", "nnx_functional", "shrunk_nnx_model", "rebuild_nnx",
           "copy_modes", "MODE_ATTRIBUTES", "check_nnx_inputs"]


class ShrunkLinen(nn.Module):
    """A Linen module running a shrunk function over its own variables.

    ``fn(variables, *args)`` is the shrunk forward; ``template`` holds the
    reduced variables (``init`` returns them). With ``returns_updates`` the
    forward returns ``(out, updates)`` (Linen's ``mutable=`` convention) and
    the updates are written back, so ``apply(..., mutable=[...])`` works.
    """

    fn: Callable
    template: Any
    returns_updates: bool = False

    @nn.compact
    def __call__(self, *args: Any) -> Any:
        handles = {col: {name: self.variable(col, name, lambda v=val: v)
                         for name, val in sub.items()}
                   for col, sub in self.template.items()}
        variables = {col: {name: h.value for name, h in sub.items()} for col, sub in handles.items()}
        out = self.fn(variables, *args)
        if not self.returns_updates:
            return out
        y, updates = out
        for col, sub in dict(updates).items():
            if self.is_mutable_collection(col):
                for name, val in dict(sub).items():
                    handles[col][name].value = val
        return y


def linen_result(apply_fn: Callable, small: PyTree, returns_updates: bool) -> ShrunkLinen:
    """A ``ShrunkLinen`` holding ``small`` (structural pruning, Fang et al. 2023)."""
    template = jax.tree.map(lambda x: x, dict(small))
    return ShrunkLinen(fn=apply_fn, template=template, returns_updates=returns_updates)


def nnx_functional(model: nnx.Module) -> tuple[Callable, PyTree, Any]:
    """``(apply, pure_variables, state)`` for an NNX model (to trace it for
    DepGraph-style coupling, Fang et al. 2023).

    ``apply(pure, *x)`` returns ``(out, new_non_param_state)`` (BatchNorm
    statistics updated in train mode), with paths shared with ``pure``.
    """
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)

    def apply(variables: PyTree, *x: Any) -> Any:
        st = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(st, variables)
        m = nnx.merge(graphdef, st)
        out = m(*x)
        return out, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

    return apply, pure, state


def check_nnx_inputs(model: nnx.Module, args: tuple) -> None:
    """Raises ``TypeError`` when an NNX model is given its state as the first
    input (the Linen form ``prune_channels(module, variables, x)``): an NNX
    model holds its own variables."""
    if not args:
        return
    first = args[0]
    state_like = isinstance(first, (nnx.State, nnx.Module, nnx.Variable))
    if not state_like and isinstance(first, dict):
        try:
            pure = nnx.to_pure_dict(nnx.state(model))
            state_like = jax.tree.structure(first) == jax.tree.structure(pure)
        except Exception:  # noqa: BLE001 - not comparable: not the model's state
            state_like = False
    if state_like:
        raise TypeError(
            "for an NNX module pass only the inputs: prune_channels(model, x, ...) "
            f"(the first input is {type(first).__name__}, the model's own state; the NNX "
            "model holds its variables, so prune_channels(model, nnx.state(model), x) is the "
            "Linen form)")


def _variable_types(state: Any) -> dict[str, type]:
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {jtree.path_str(p): type(v) for p, v in flat}


class ShrunkNNX(nnx.Module):
    """An NNX model whose Variables have the reduced shapes.

    ``vars`` mirrors the original state's nesting; ``__call__`` runs the shrunk
    function and writes updated non-parameter state (batch statistics) back.
    """

    def __init__(self, fn: Callable, variables: PyTree) -> None:
        self.fn = fn
        self.vars = nnx.data(variables)

    def pure(self) -> PyTree:
        return jax.tree.map(lambda v: v[...], self.vars, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def __call__(self, *x: Any) -> Any:
        out, new = self.fn(self.pure(), *x)
        flat = {p: v for p, v in jtree.leaves_with_paths(new)}
        vflat = jax.tree_util.tree_flatten_with_path(self.vars, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        for p, var in vflat:
            path = jtree.path_str(p)
            if path in flat and not isinstance(var, nnx.Param):
                var[...] = flat[path]
        return out


def shrunk_nnx_model(fn: Callable, small_pure: PyTree, state: Any) -> ShrunkNNX:
    """Wraps reduced pure variables in the Variable types of the original state
    (a shrunk model in the sense of Li et al. 2017 / Fang et al. 2023)."""
    types = _variable_types(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(small_pure)
    wrapped = [types.get(jtree.path_str(p), nnx.Param)(x) for p, x in flat]
    return ShrunkNNX(fn, jax.tree.unflatten(treedef, wrapped))


#: Module attributes that ``nnx.Module.train()`` / ``eval()`` switch; a rebuilt
#: model takes them from the model it replaces.
MODE_ATTRIBUTES = ("deterministic", "use_running_average")


def copy_modes(source: nnx.Module, target: nnx.Module) -> None:
    """Sets every ``MODE_ATTRIBUTES`` attribute of ``target``'s submodules to its
    value in ``source``'s submodule at the same graph path (a freshly built
    model is in training mode; the model it replaces may be in eval mode)."""
    src = {path: node for path, node in nnx.iter_graph(source) if isinstance(node, nnx.Module)}
    for path, node in nnx.iter_graph(target):
        if isinstance(node, nnx.Module) and path in src:
            for name in MODE_ATTRIBUTES:
                if name in vars(src[path]) and name in vars(node):
                    setattr(node, name, getattr(src[path], name))


def rebuild_nnx(make_model: Callable[[], nnx.Module], variables: PyTree,
                like: nnx.Module | None = None) -> nnx.Module:
    """Builds ``make_model()`` fresh (abstractly, ``nnx.eval_shape``) and merges
    the reduced ``variables`` into it; the shapes must match the new config.

    Use when the model is built from a plain config and the reduced widths are
    known: the result is an ordinary instance of the user's class, never the
    stale graphdef of the unpruned model (Flax NNX's split/merge discipline).
    With ``like``, the train/eval mode of each submodule is copied from it
    (``copy_modes``), so a model pruned in eval mode comes back in eval mode.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, state = nnx.split(abstract)
    want = {p: tuple(x.shape) for p, x in jtree.leaves_with_paths(nnx.to_pure_dict(state))}
    have = {p: tuple(np.shape(x)) for p, x in jtree.leaves_with_paths(variables)}
    for p in list(want) + list(have):
        if want.get(p) != have.get(p):
            raise StructuredPruningError(
                f"rebuilt model does not fit the pruned variables at '{p}': "
                f"model {want.get(p)} vs variables {have.get(p)}")
    nnx.replace_by_pure_dict(state, variables)
    model = nnx.merge(graphdef, state)
    if like is not None:
        copy_modes(like, model)
    return model
