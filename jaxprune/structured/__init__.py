"""Structured pruning that really shrinks models.

Groups of coupled axes are found from the jaxpr (DepGraph, Fang et al. 2023),
ranked by group importance, recorded in a JSON plan and removed for real: the
shrunk forward pass re-emits the traced jaxpr at the reduced shapes, so it
works for any JAX function, including Flax modules with hard-coded widths.

Data flow::

    groups(apply_fn, variables, *inputs)          -> [Group(members, size)]
    group_importance(variables, groups, "l2")     -> one score per channel
    select_channels(groups, scores, sparsity)     -> kept indices per group
    make_plan(variables, groups, kept)            -> JSON plan (replayable)
    shrink(apply_fn, variables, plan)             -> (small variables, jitted forward)
    zero_removed(variables, plan)                 -> the masked dense reference

or in one call, ``prune_channels(target, *args, sparsity=...)`` for a Linen
module (``args = (variables, *inputs)``), an NNX model (``args = inputs``) or
any ``apply_fn(variables, *inputs)``. Training towards a structure:
``group_lasso`` (an optax transformation) and ``group_masks``.

>>> import jax.numpy as jnp
>>> f = lambda v, x: jnp.tanh(x @ v["w1"] + v["b1"]) @ v["w2"]
>>> v = {"w1": jnp.ones((3, 8)), "b1": jnp.zeros(8), "w2": jnp.ones((8, 2))}
>>> print(groups(f, v, jnp.ones((1, 3)))[0])
Group(size=8, 3 members)
  b1  axis 0
  w1  axis 1
  w2  axis 0
>>> small, forward = shrink(f, v, plan_for(f, v, jnp.ones((1, 3)), sparsity=0.75))
>>> small["w1"].shape, forward(small, jnp.ones((5, 3))).shape
((3, 2), (5, 2))

Flax adapters (Linen ``ShrunkLinen``, NNX ``ShrunkNNX``, ``rebuild_nnx``) live in
``jaxprune.structured.flax``, the only module here that imports flax.
"""
from jaxprune.structured.trace import StructuredPruningError
from jaxprune.structured.groups import Group, groups
from jaxprune.structured.importance import group_importance, select_channels
from jaxprune.structured.plan import (check_plan, describe, group_masks, kept_positions,
                                      make_plan, plan_groups, slice_variables, zero_removed)
from jaxprune.structured.api import (PruneResult, ShrunkFunction, param_count, plan_for,
                                     prune_channels, prune_function, shrink)
from jaxprune.structured.regularize import group_lasso, group_norms
from jaxprune.structured.training import channels_kept, group_rule, prune_groups

__all__ = [
    "StructuredPruningError", "Group", "groups", "group_importance", "select_channels",
    "check_plan", "describe", "group_masks", "kept_positions", "make_plan", "plan_groups",
    "slice_variables", "zero_removed", "PruneResult", "ShrunkFunction", "param_count",
    "plan_for", "prune_channels", "prune_function", "shrink", "group_lasso", "group_norms",
    "channels_kept", "group_rule", "prune_groups",
]
