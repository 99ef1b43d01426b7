"""Shrinking a traced function by a plan, and the one-call ``prune_channels``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxprune import tree as jtree
from jaxprune.structured import importance as imp
from jaxprune.structured import jaxpr_params as jp
from jaxprune.structured import native
from jaxprune.structured import plan as plan_lib
from jaxprune.structured.groups import Group, analyze
from jaxprune.structured.shrink import Shrinker, check_random_bits
from jaxprune.structured.trace import StructuredPruningError

PyTree = Any

__all__ = ["ShrunkFunction", "shrink", "plan_for", "prune_function", "prune_channels", "PruneResult",
           "param_count"]


def _abstract(tree: PyTree) -> PyTree:
    def one(x):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            x = np.asarray(x)
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return jax.tree.map(one, tree)


def param_count(variables: PyTree) -> int:
    """Number of scalars in a pytree of arrays (the size Li et al. 2017 report).

    >>> import numpy as np
    >>> param_count({"w": np.ones((3, 4)), "b": np.ones(4)})
    16
    """
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(variables)))


class ShrunkFunction:
    """``fn(small_variables, *args)``: the traced function at the reduced shapes.

    The function is re-emitted from the jaxpr of ``apply_fn`` (traced at the
    full shapes); a new input shape (another batch size) triggers one re-trace.
    Differentiable and jittable; wrap it in ``jax.jit`` (``shrink`` does).
    Random bits (dropout) are drawn at the reduced shapes unless
    ``random_bits="exact"`` (see ``shrink``). Structural pruning by re-emission
    follows the groups of DepGraph (Fang et al. 2023). ``semantics`` says what a
    reduction over a pruned axis computes (see ``shrink``); with ``"native"``
    and a ``reference`` that aligns with the plan, the reference itself (the
    model at the reduced widths) is run.
    """

    def __init__(self, apply_fn: Callable, full_variables: PyTree, plan: dict,
                 prunable_io: bool = False, semantics: Optional[str] = None,
                 reference: Any = "auto", random_bits: str = "reduced") -> None:
        self.apply_fn = apply_fn
        self.full = _abstract(full_variables)
        self.plan = plan
        self.prunable_io = prunable_io
        self.semantics = plan_lib.semantics_of(plan, semantics)
        self.reference = reference
        self.random_bits = check_random_bits(random_bits)
        self.small = jax.eval_shape(lambda v: plan_lib.slice_variables(v, plan), self.full)
        self._cache: dict[Any, tuple] = {}
        self.method: Optional[str] = None  # native: "reference" or "analytic" (last call)

    def _prepared(self, args: tuple) -> tuple:
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves))
        got = self._cache.get(key)
        if got is None:
            a = analyze(self.apply_fn, self.full, *_abstract(args), prunable_io=self.prunable_io)
            plan_lib.check_plan(self.plan, self.full, a.groups)
            keep = {atom: np.asarray(e["keep"], np.int64)
                    for atom, e in zip(a.atoms, self.plan["groups"])}
            s = Shrinker(a, keep, self.semantics)
            ref = None
            if self.semantics == "native":
                ref = self._reference(s, args)
                if ref is None:
                    s.constants = native.width_constants(s)
            got = (a, keep, s.constants, ref)
            self._cache[key] = got
        a, keep, constants, ref = got
        self.method = None if self.semantics == "masked" else ("analytic" if ref is None
                                                                else "reference")
        return a, Shrinker(a, keep, self.semantics, constants, self.random_bits), ref

    def _reference(self, s: Shrinker, args: tuple) -> Optional[Callable]:
        """The model at the reduced widths, if it aligns with the plan."""
        fn = self.apply_fn if self.reference == "auto" else self.reference
        if fn is None or fn is False:
            return None
        jaxpr = jp.sub(s.a.closed_jaxpr).jaxpr
        n = len(s.a.leaf_paths)
        small_args = jax.tree.unflatten(jax.tree.structure(args), [
            jax.ShapeDtypeStruct(s.new_shape(v, ()), v.aval.dtype)
            for v in jaxpr.invars[n:]])
        try:
            native.align(s, native.trace_reference(fn, self.small, small_args))
        except Exception:
            if self.reference != "auto":
                raise
            return None  # the function cannot run at the reduced widths: analytic
        return fn

    def __call__(self, variables: PyTree, *args: Any) -> Any:
        a, s, ref = self._prepared(args)
        if ref is not None:
            jaxpr = jp.sub(a.closed_jaxpr).jaxpr
            n = len(a.leaf_paths)
            cut = [s.cut(x, v, ()) for x, v in zip(jax.tree.leaves(args), jaxpr.invars[n:])]
            return ref(variables, *jax.tree.unflatten(jax.tree.structure(args), cut))
        var_leaves = jtree.leaves_with_paths(variables)
        have = [p for p, _ in var_leaves]
        if have != a.leaf_paths:
            first = next((x for x, y in zip(have + [None], a.leaf_paths + [None]) if x != y))
            raise StructuredPruningError(
                f"the variables do not match the pruned model: first differing path "
                f"{first!r} (expected paths {a.leaf_paths[:5]}...)")
        jaxpr, consts = jp.sub(a.closed_jaxpr)
        for (path, x), v in zip(var_leaves, jaxpr.invars):
            want = s.new_shape(v, ())
            if tuple(np.shape(x)) != want:
                raise StructuredPruningError(
                    f"'{path}' has shape {tuple(np.shape(x))}; the shrunk model expects {want}")
        outs = s.run(jaxpr, consts, [x for _, x in var_leaves], jax.tree.leaves(args))
        return jax.tree.unflatten(a.out_treedef, outs)


def plan_for(apply_fn: Callable, variables: PyTree, *example_args: Any, sparsity: float = 0.5,
             importance: imp.Importance = "l2", scope: str = "local", reduce: str = "sum",
             normalize: Optional[str] = None, round_to: int = 1,
             min_channels: Optional[int] = None, ignore: Any = None,
             grads: Optional[PyTree] = None, seed: int = 0, prunable_io: bool = False,
             semantics: str = "masked") -> dict:
    """A JSON pruning plan for ``apply_fn``: which channels of each group stay.

    Groups come from the jaxpr (DepGraph, Fang et al. 2023) and are ranked by
    group importance (``group_importance``: L1, Li et al. 2017; BN scale, Liu
    et al. 2017; Taylor, Molchanov et al. 2019; ...).

    Args:
      apply_fn, variables: the traced function and its variables.
      *example_args: its example inputs.
      sparsity: fraction of each group's channels removed (``scope="local"``)
        or of all channels (``scope="global"``).
      importance: ``"l1" | "l2" | "taylor" | "saliency" | "bn_scale" |
        "random"`` or a callable ``(group, leaves, grads) -> scores``.
      scope, round_to, min_channels, ignore: see ``select_channels``.
      reduce, normalize, grads, seed: see ``group_importance``.
      prunable_io: also prune axes that reach the inputs or outputs.
      semantics: ``"masked"`` or ``"native"``, recorded in the plan (see ``shrink``).

    Returns:
      A JSON-serialisable plan (see ``jaxprune.structured.plan``).
    """
    found = analyze(apply_fn, variables, *example_args, prunable_io=prunable_io).groups
    scores = imp.group_importance(variables, found, importance, grads=grads, reduce=reduce,
                                  normalize=normalize, seed=seed)
    kept = imp.select_channels(found, scores, sparsity, scope=scope, round_to=round_to,
                               min_channels=min_channels, ignore=ignore)
    return plan_lib.make_plan(variables, found, kept, semantics=semantics)


def shrink(apply_fn: Callable, variables: PyTree, plan: dict, *, prunable_io: bool = False,
           semantics: Optional[str] = None, reference: Any = "auto",
           random_bits: str = "reduced") -> tuple[PyTree, Callable]:
    """Smaller variables and a jitted, differentiable forward at reduced shapes.

    The forward re-emits the jaxpr of ``apply_fn`` with the shape parameters
    along pruned axes rewritten, so it works for any JAX function, including
    modules with hard-coded widths (DepGraph, Fang et al. 2023).

    ``semantics`` (default: the plan's, else ``"masked"``) fixes what a
    reduction over a pruned axis (a mean in a norm, a softmax, attention over
    a smaller head size) computes:

    * ``"masked"``: exactly ``apply_fn(zero_removed(variables, plan), x)``,
      the masked dense model (what training with ``prune_groups`` masks
      optimised), whatever the spelling (``jnp.mean`` with or without
      ``keepdims``, ``jnp.var``/``std``, LayerNorm, RMSNorm, GroupNorm,
      weight standardisation, softmax). Where an op makes it impossible to
      carry exactly, an error names the op.
    * ``"native"``: the model built at the reduced widths with the sliced
      parameters: every constant that encodes a pruned width (a mean's
      divisor, ``1/sqrt(head_dim)``) follows the reduced width. With a
      ``reference`` (``reference(small_variables, *inputs)``, the model at the
      reduced widths; by default ``apply_fn`` itself is tried, which works for
      functions that read widths from the arrays) it is traced at the reduced
      shapes, checked equation by equation against the plan, and run;
      otherwise width constants are found analytically, and a constant that
      might encode a width but matches no known pattern is an error
      (``jaxprune.structured.native``). ``reference=False`` skips the trial.

    ``random_bits``: ``"reduced"`` (default) draws random bits (dropout masks)
    along pruned axes at the reduced shape: the same distribution as the
    masked dense model's draw cut to the kept channels, at the cost of the
    small model. ``"exact"`` draws them at the full shape and cuts them, so
    the shrunk output equals the masked dense model's bit for bit (tests).

    Returns:
      ``(small_variables, jitted_fn)`` with ``jitted_fn(small_variables, *args)``.
    """
    plan_lib.check_plan(plan, variables)
    small = plan_lib.slice_variables(variables, plan)
    return small, jax.jit(ShrunkFunction(apply_fn, variables, plan, prunable_io, semantics,
                                         reference, random_bits))


@dataclasses.dataclass
class PruneResult:
    """What ``prune_channels`` returns."""

    variables: PyTree
    apply: Callable
    plan: dict
    groups: list[Group]
    params_before: int
    params_after: int
    module: Any = None
    model: Any = None

    def __repr__(self) -> str:
        kept = [len(e["keep"]) for e in self.plan["groups"]]
        sizes = [e["size"] for e in self.plan["groups"]]
        return (f"PruneResult(params {self.params_before} -> {self.params_after}, "
                f"group widths {sizes} -> {kept})")


def prune_function(apply_fn: Callable, variables: PyTree, *example_args: Any,
                   **kwargs: Any) -> PruneResult:
    """``plan_for`` + ``shrink`` for any ``apply_fn(variables, *inputs)``.

    Group importance and coupling as in DepGraph (Fang et al. 2023); keyword
    arguments are those of ``plan_for`` (``semantics="masked"|"native"``
    included), and ``random_bits`` of ``shrink``.
    """
    prunable_io = kwargs.get("prunable_io", False)
    random_bits = kwargs.pop("random_bits", "reduced")
    plan = plan_for(apply_fn, variables, *example_args, **kwargs)
    small, fn = shrink(apply_fn, variables, plan, prunable_io=prunable_io, random_bits=random_bits)
    return PruneResult(small, fn, plan, plan_lib.plan_groups(plan), param_count(variables),
                       param_count(small))


def _is_flax(target: Any, sub: str) -> bool:
    return any(c.__module__.startswith(sub) for c in type(target).__mro__)


def prune_channels(target: Any, *args: Any, sparsity: float = 0.5,
                   importance: imp.Importance = "l2", round_to: int = 1,
                   ignore: Any = None, plan: Optional[dict] = None,
                   apply_kwargs: Optional[dict] = None, rebuild: Optional[Callable] = None,
                   semantics: Optional[str] = None, random_bits: str = "reduced",
                   **kwargs: Any) -> PruneResult:
    """Removes ``sparsity`` of the channels of every coupled group, for real.

    Groups come from the jaxpr (DepGraph, Fang et al. 2023), ranked by
    ``importance`` (``"l1"``: Li et al. 2017; ``"bn_scale"``: Liu et al. 2017;
    ``"taylor"``: Molchanov et al. 2019, with ``grads=``; ``"l2"``;
    ``"random"``; or a callable); see ``plan_for`` for ``scope``, ``reduce``,
    ``normalize``, ``min_channels``. A given ``plan`` is replayed instead.

    Args:
      target: a Linen module (``args = (variables, *example_inputs)``), an NNX
        model (``args = example_inputs``) or any ``apply_fn(variables, *inputs)``.
      apply_kwargs: keyword arguments for a Linen ``module.apply`` (e.g.
        ``{"train": True, "mutable": ["batch_stats"]}``).
      semantics: ``"masked"`` (default: the shrunk model equals
        ``model.apply(zero_removed(variables, plan), x)`` exactly) or
        ``"native"`` (it equals the model built at the reduced widths); see
        ``shrink``. Recorded in the plan; a replayed plan keeps its own.
      rebuild: the model built at the reduced widths, from the small
        variables: NNX ``rebuild(small_variables) -> nnx.Module`` (built under
        ``nnx.eval_shape``; the reduced variables are merged in, so ``.model``
        is an instance of your class) or Linen ``rebuild(small_variables) ->
        nn.Module`` (``.module``). It implies ``semantics="native"``: the
        rebuilt model is traced, checked equation by equation against the
        plan (an error names the first equation where it prunes differently)
        and ``.apply`` runs it, so ``.apply`` and ``.model``/``.module`` agree.
      random_bits: ``"reduced"`` (default) or ``"exact"``: how the shrunk
        forward draws random bits (dropout masks); see ``shrink``.

    Returns:
      ``PruneResult`` with ``.variables``, ``.apply`` (jitted forward
      ``(variables, *inputs)`` at reduced shapes), ``.plan`` (JSON data),
      ``.groups``, ``.module`` (Linen) or ``.model`` (NNX).

    >>> import jax.numpy as jnp
    >>> f = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"]
    >>> v = {"w1": jnp.ones((3, 8)), "w2": jnp.ones((8, 2))}
    >>> r = prune_channels(f, v, jnp.ones((1, 3)), sparsity=0.5)
    >>> r.variables["w1"].shape, r.params_before, r.params_after
    ((3, 4), 40, 20)
    """
    if rebuild is not None:
        if semantics == "masked" or (plan is not None and plan.get("semantics") == "masked"):
            raise ValueError("rebuild= builds the model at the reduced widths, which computes the "
                             "native semantics; pass semantics='native' (or drop rebuild=)")
        semantics = "native"
    if plan is not None and semantics is not None and plan.get("semantics", "masked") != semantics:
        plan = {**plan, "semantics": semantics}
    options = dict(sparsity=sparsity, importance=importance, round_to=round_to, ignore=ignore,
                   semantics=semantics or "masked", random_bits=check_random_bits(random_bits),
                   **kwargs)
    apply_kwargs = dict(apply_kwargs or {})
    if _is_flax(target, "flax.nnx"):
        from jaxprune.structured import flax as fx
        fx.check_nnx_inputs(target, args)
        fn, variables, state = fx.nnx_functional(target)
        rebuilt = None if rebuild is None else (
            lambda small: fx.rebuild_nnx(lambda: rebuild(small), small, like=target))
        full = _run(fn, variables, args, plan, options, reference=False, rebuild=rebuilt)
        small_fn = full.apply
        full.apply = jax.jit(lambda v, *x: small_fn(v, *x)[0])
        if rebuild is None:
            full.model = fx.shrunk_nnx_model(small_fn, full.variables, state)
        return full
    if _is_flax(target, "flax.linen"):
        from jaxprune.structured import flax as fx
        if not args:
            raise TypeError("for a Linen module pass prune_channels(module, variables, *inputs)")
        variables, inputs = args[0], args[1:]
        updates = bool(apply_kwargs.get("mutable"))
        fn = lambda v, *x: target.apply(v, *x, **apply_kwargs)
        full = _run(fn, variables, inputs, plan, options, reference="auto", rebuild=rebuild,
                    linen_kwargs=apply_kwargs)
        if rebuild is None:
            full.module = fx.linen_result(full.apply, full.variables, updates)
        return full
    if not callable(target):
        raise TypeError(f"target must be a Flax module or apply_fn, got {type(target).__name__}")
    if apply_kwargs:
        fn0 = target
        target = lambda v, *x: fn0(v, *x, **apply_kwargs)
    return _run(target, args[0], args[1:], plan, options, reference="auto",
                rebuild=None if rebuild is None else lambda small: rebuild)


def _run(fn: Callable, variables: PyTree, inputs: tuple, plan: Optional[dict], options: dict,
         reference: Any, rebuild: Optional[Callable] = None,
         linen_kwargs: Optional[dict] = None) -> PruneResult:
    options = dict(options)
    prunable_io = options.get("prunable_io", False)
    random_bits = options.pop("random_bits", "reduced")
    if plan is None:
        plan = plan_for(fn, variables, *inputs, **options)
    else:
        plan_lib.check_plan(plan, variables, analyze(fn, variables, *inputs,
                                                     prunable_io=prunable_io).groups)
    model = None
    if rebuild is not None:
        small = plan_lib.slice_variables(variables, plan)
        model = rebuild(small)
        reference = _reference_of(model, linen_kwargs)
    small, shrunk = shrink(fn, variables, plan, prunable_io=prunable_io, reference=reference,
                           random_bits=random_bits)
    if rebuild is not None:
        jax.eval_shape(shrunk, small, *inputs)  # traces the rebuilt model, checks it against the plan
    result = PruneResult(small, shrunk, plan, plan_lib.plan_groups(plan), param_count(variables),
                         param_count(small))
    if model is not None and linen_kwargs is not None:
        result.module = model
    elif model is not None and _is_flax(model, "flax.nnx"):
        result.model = model
    return result


def _reference_of(model: Any, linen_kwargs: Optional[dict]) -> Callable:
    """``reference(small_variables, *inputs)`` for a rebuilt model or function."""
    if _is_flax(model, "flax.nnx"):
        from jaxprune.structured import flax as fx
        return fx.nnx_functional(model)[0]
    if _is_flax(model, "flax.linen"):
        kw = dict(linen_kwargs or {})
        return lambda v, *x: model.apply(v, *x, **kw)
    if callable(model):
        return model
    raise TypeError(f"rebuild= must return a Flax module or a function, got {type(model).__name__}")
