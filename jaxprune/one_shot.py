"""One-shot pruning after training, from calibration data: magnitude, Wanda, SparseGPT.

``oneshot(apply_fn, variables, batches, method, sparsity)`` prunes a trained
model without retraining and without any change to its code: the weights to
prune and the inputs that meet them are found in the jaxpr of
``apply_fn(variables, *batch)`` (``jaxprune.calibration``).

* ``"magnitude"``: ``|W|`` (Han et al. 2015), compared within each layer.
* ``"wanda"``: ``|W_ij|·‖X_j‖₂``, compared within each output row (Sun et al.
  2023, "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv 2306.11695).
* ``"sparsegpt"``: layer-wise Optimal Brain Surgeon with weight
  reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774;
  ``jaxprune.sparsegpt``).

Each weight is read as a matrix (rows = outputs, columns = input features:
the leaf axes its matmul contracts); N:M keeps n of every m consecutive
input features of a row. With ``sequential=True`` the layers are pruned
stage by stage (``jaxprune.layer_order``): the calibration inputs of a stage
are computed with all earlier stages already pruned (and reconstructed),
as both papers do for LLMs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import masks as mask_lib
from jaxprune import threshold
from jaxprune import tree as jtree
from jaxprune.calibration import Calibration, LayerStats, from_matrix, to_matrix
from jaxprune.sparsegpt import sparsegpt

PyTree = Any

__all__ = ["OneShotResult", "oneshot", "METHODS", "parse_sparsity", "activation_importance"]

#: The one-shot methods of ``oneshot``.
METHODS = ("magnitude", "wanda", "sparsegpt")


class OneShotResult(NamedTuple):
    """``variables``: the pruned variables (same structure and dtypes; pruned
    weights exactly 0, SparseGPT's survivors updated); ``masks``: bool keep
    masks on the pruned leaves, None elsewhere (as in ``jaxprune.masks``),
    ready for ``jaxprune.fixed_masks`` to fine-tune."""

    variables: PyTree
    masks: PyTree


def parse_sparsity(sparsity: Union[float, str, tuple]) -> tuple[Optional[float], Optional[tuple]]:
    """``0.5`` -> ``(0.5, None)``; ``"2:4"`` or ``(2, 4)`` -> ``(None, (2, 4))``
    (n kept of every m, the convention of sparse tensor cores).

    >>> parse_sparsity("2:4"), parse_sparsity(0.7)
    ((None, (2, 4)), (0.7, None))
    """
    if isinstance(sparsity, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", sparsity)
        if not match:
            raise ValueError(f"sparsity={sparsity!r}: expected a float in [0, 1] or 'n:m' like '2:4'")
        sparsity = (int(match.group(1)), int(match.group(2)))
    if isinstance(sparsity, tuple):
        n, m = sparsity
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
            raise ValueError(f"sparsity={sparsity!r}: N:M needs integers 0 < n <= m")
        return None, (n, m)
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1] (or 'n:m')")
    return s, None


# ------------------------------------------------------------ per-layer pruning
def _keep_per_row(scores: jax.Array, sparsity: float) -> jax.Array:
    """Exactly round(s·columns) pruned in every row (Wanda's per-output
    comparison group), ranked like the mask core: ``threshold.order_keys``
    (NaN lowest), ties pruned earlier index first. Rows are short and many,
    so a per-row ``top_k`` beats the radix select's 65,536-bin histograms."""
    cols = scores.shape[-1]
    k = threshold.prune_count(sparsity, cols)
    if k == 0:
        return jnp.ones(scores.shape, bool)
    keys = threshold.order_keys(scores, scores.dtype.itemsize > 4)
    _, lowest = lax.top_k(~keys, k)  # top_k keeps the lower index first among ties
    n = scores.size // cols
    keep = jnp.ones((n, cols), bool).at[jnp.arange(n)[:, None], lowest.reshape(n, k)].set(False)
    return keep.reshape(scores.shape)


@functools.partial(jax.jit, static_argnames=("method", "sparsity", "nm", "comparison",
                                             "blocksize", "percdamp"))
def _prune_layer(w: jax.Array, sq_norm: Optional[jax.Array], gram: Optional[jax.Array], *,
                 method: str, sparsity: Optional[float], nm: Optional[tuple], comparison: str,
                 blocksize: int, percdamp: float) -> tuple:
    """``w``: (groups, rows, columns) float32 -> (new w, keep, damp, dead)."""
    g = w.shape[0]
    zeros = (jnp.zeros(g), jnp.zeros((g, w.shape[-1]), bool))
    if method == "sparsegpt":
        r = jax.vmap(lambda a, h: sparsegpt(a, h, sparsity=sparsity or 0.0, nm=nm,
                                            blocksize=blocksize, percdamp=percdamp))(w, gram)
        return r.weights, r.mask, r.damp, r.dead
    score = jnp.abs(w)
    if method == "wanda":
        score = score * jnp.sqrt(sq_norm)[:, None, :]
    if nm is not None:
        keep = mask_lib.n_of_m({"s": score}, nm[0], nm[1], axis=-1, where=lambda *_: True)["s"]
    elif comparison == "row":
        keep = _keep_per_row(score, sparsity)
    else:
        keep = mask_lib.unstructured({"s": score}, sparsity, where=lambda *_: True)["s"]
    return jnp.where(keep, w, 0.0), keep, *zeros


def _unit_index(stats: LayerStats, coords: tuple) -> tuple:
    fixed = dict(coords)
    return tuple(fixed.get(a, slice(None)) for a in stats.group_axes)


def _check_nm(path: str, shape: tuple, in_axes: tuple, nm: tuple) -> None:
    if not in_axes:
        raise ValueError(f"leaf '{path}' has no input-feature axis for N:M")
    last = in_axes[-1]
    if shape[last] % nm[1]:
        raise ValueError(f"leaf '{path}': N:M {nm[0]}:{nm[1]} groups m={nm[1]} consecutive input "
                         f"features along axis {last}, whose length {shape[last]} is not "
                         f"divisible by {nm[1]}")


def _warn_hessian(path: str, stats: LayerStats, idx: tuple, damp, dead, percdamp: float) -> None:
    """Warns (with the λ added) when a layer's Hessian H = 2XXᵀ is singular,
    and raises if even the largest dampening could not make it factorise."""
    gram = np.asarray(stats.gram[idx], np.float64).reshape(-1, *stats.gram.shape[-2:])
    count = np.asarray(stats.count[idx]).reshape(-1)
    damp, dead = np.asarray(damp).reshape(-1), np.asarray(dead).reshape(-1, gram.shape[-1])
    cols = gram.shape[-1]
    for i in range(gram.shape[0]):
        where = f"'{path}'" + (f" (group {i})" if gram.shape[0] > 1 else "")
        if not np.isfinite(damp[i]):
            raise np.linalg.LinAlgError(
                f"SparseGPT: the Hessian of {where} could not be factorised even with a "
                f"dampening of 10^8 x percdamp={percdamp} times its mean diagonal")
        diag = 2.0 * np.diagonal(gram[i])
        mean = float(np.mean(np.where(dead[i], 1.0, diag)))
        reasons = []
        if dead[i].any():
            reasons.append(f"{int(dead[i].sum())} of {cols} inputs are always 0 "
                           "(their diagonal was set to 1, their weights pruned first)")
        if count[i] < cols:
            reasons.append(f"{int(count[i])} calibration rows for {cols} inputs")
        if damp[i] > 1.01 * percdamp * mean:
            reasons.append("the Cholesky factorisation failed with the default dampening")
        if reasons:
            warnings.warn(f"SparseGPT: the Hessian H = 2XXᵀ of {where} is singular "
                          f"({'; '.join(reasons)}); added λ = {damp[i]:.4g} "
                          f"({damp[i] / mean:.2%} of its mean diagonal) to the diagonal",
                          RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------ the entry point
def oneshot(apply_fn: Callable, variables: PyTree, batches: Iterable[Any],
            method: str = "wanda", sparsity: Union[float, str, tuple] = 0.5,
            where: jtree.Where = None, sequential: bool = True, *,
            comparison: Optional[str] = None, blocksize: int = 128,
            percdamp: float = 0.01) -> OneShotResult:
    """Prunes a trained model in one shot from calibration data.

    Methods: ``"magnitude"`` (``|W|``, Han et al. 2015), ``"wanda"``
    (``|W_ij|·‖X_j‖₂``, Sun et al. 2023, arXiv 2306.11695) and ``"sparsegpt"``
    (OBS with reconstruction, Frantar & Alistarh 2023, arXiv 2301.00774).
    Every weight that a ``dot_general`` or ``conv_general_dilated`` of
    ``apply_fn`` multiplies is read as a (rows = outputs, columns = inputs)
    matrix; its inputs' statistics come from ``jaxprune.calibrate``.

    Args:
      apply_fn: ``apply_fn(variables, *inputs)`` (a Linen ``module.apply``,
        an NNX ``split``/``merge`` function, any JAX function).
      variables: the trained variables.
      batches: calibration inputs: each item one array or a tuple of
        positional inputs (kept in memory; iterated once per stage).
      method: ``"magnitude" | "wanda" | "sparsegpt"``.
      sparsity: a fraction in [0, 1] (unstructured), or ``"n:m"`` / ``(n, m)``
        keeping n of every m consecutive input features of each row (2:4).
      where: which leaves (``jaxprune.tree`` selector). ``None``: every
        floating leaf with ``ndim >= 2`` that a matmul or convolution uses.
      sequential: prune stage by stage, the inputs of each stage computed
        with the earlier stages pruned (``jaxprune.layer_order``): one pass
        over ``batches`` per stage, holding the statistics of that stage's
        leaves only (a scanned leaf's statistics cover all its slices).
        False collects every statistic once from the dense model.
      comparison: unstructured selection group: ``"row"`` (exact count per
        output row; Wanda's default) or ``"layer"`` (per layer; magnitude's
        default). SparseGPT selects adaptively per block of 128 columns.
      blocksize, percdamp: SparseGPT's block size and dampening
        (λ = percdamp·mean(diag H); a singular H warns with the λ added).

    Returns:
      ``OneShotResult(variables, masks)``.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"]
    >>> v = {"w1": jax.random.normal(jax.random.key(0), (8, 16)),
    ...      "w2": jax.random.normal(jax.random.key(1), (16, 4))}
    >>> x = jax.random.normal(jax.random.key(2), (32, 8))
    >>> pruned, masks = oneshot(f, v, [x], method="wanda", sparsity="2:4")
    >>> int(masks["w1"].sum()), float(jnp.mean(pruned["w2"] == 0))
    (64, 0.5)
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")
    frac, nm = parse_sparsity(sparsity)
    if comparison is not None and method == "sparsegpt":
        raise ValueError("comparison= applies to magnitude and wanda; SparseGPT selects its mask "
                         "per block of columns (blocksize=)")
    comparison = comparison or ("row" if method == "wanda" else "layer")
    if comparison not in ("row", "layer"):
        raise ValueError(f"comparison={comparison!r}; expected 'row' or 'layer'")
    cal = Calibration(apply_fn, variables, batches, where)
    leaves, treedef = jax.tree.flatten(variables)
    leaves = list(leaves)
    layouts = {k: LayerStats(None, None, None, *cal.site_layout(k)) for k in cal.selected}
    if nm is not None:
        for k in cal.selected:
            _check_nm(cal.paths[k], cal.shapes[k], layouts[k].in_axes, nm)
    stages = cal.layers.stages()
    if method == "magnitude" or not sequential:
        stages = [[unit for stage in stages for unit in stage]]
    masks: dict[int, jax.Array] = {}
    options = dict(method=method, sparsity=frac, nm=nm, comparison=comparison,
                   blocksize=blocksize, percdamp=percdamp)
    for units in stages:
        ks = sorted({k for k, _ in units})
        stats = (layouts if method == "magnitude" else
                 cal.collect(jax.tree.unflatten(treedef, leaves), ks, gram=method == "sparsegpt"))
        for k, coords in units:
            leaves[k], masks[k] = _prune_unit(cal.paths[k], leaves[k], masks.get(k), stats[k],
                                              coords, options)
    out_masks = [masks.get(k) for k in range(len(leaves))]
    return OneShotResult(jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, out_masks))


def _prune_unit(path: str, leaf: jax.Array, keep: Optional[jax.Array], stats: LayerStats,
                coords: tuple, options: dict) -> tuple[jax.Array, jax.Array]:
    """Prunes one layer (a leaf, or one scanned slice of it); returns the new
    leaf and its keep mask. The pruning itself is compiled once per matrix
    shape (q/k/v/o projections share it); gathering the layer's matrix and
    scattering it back are cheap jits of their own."""
    method = options["method"]
    data = stats if method == "sparsegpt" else dataclasses.replace(stats, gram=None)
    flat, sq, gram, finite = _unit_inputs(leaf, data, coords, method != "magnitude")
    if not finite:
        raise FloatingPointError(f"calibration statistics of '{path}' are not finite "
                                 "(NaN or inf in the calibration inputs or activations)")
    new, kept, damp, dead = _prune_layer(flat, sq, gram, **options)
    if method == "sparsegpt":
        _warn_hessian(path, stats, _unit_index(stats, coords), damp, dead, options["percdamp"])
    return _unit_outputs(leaf, keep, new, kept, stats.in_axes, stats.group_axes, coords)


@functools.partial(jax.jit, static_argnames=("coords", "with_stats"))
def _unit_inputs(leaf, stats, coords, with_stats):
    idx = _unit_index(stats, coords)
    unit = to_matrix(leaf.astype(jnp.float32), stats)[idx]
    flat = unit.reshape(-1, *unit.shape[-2:])
    if not with_stats:
        return flat, None, None, jnp.bool_(True)
    sq = stats.sq_norm[idx].reshape(flat.shape[0], -1)
    gram = None if stats.gram is None else stats.gram[idx].reshape(
        flat.shape[0], *stats.gram.shape[-2:])
    return flat, sq, gram, jnp.all(jnp.isfinite(sq))


@functools.partial(jax.jit, static_argnames=("in_axes", "group_axes", "coords"))
def _unit_outputs(leaf, keep, new, kept, in_axes, group_axes, coords):
    layout = LayerStats(None, None, None, in_axes, group_axes)
    idx = _unit_index(layout, coords)
    if keep is None:
        keep = jnp.ones(leaf.shape, bool)
    mat, keep_mat = to_matrix(leaf, layout), to_matrix(keep, layout)
    shape = mat[idx].shape
    mat = mat.at[idx].set(new.reshape(shape).astype(leaf.dtype))
    keep_mat = keep_mat.at[idx].set(kept.reshape(shape))
    return from_matrix(mat, leaf.shape, layout), from_matrix(keep_mat, leaf.shape, layout)


# ------------------------------------------------------------ structured
def activation_importance(stats: dict[str, LayerStats]) -> Callable:
    """Channel importance from calibration statistics, for
    ``jaxprune.structured.prune_channels(..., importance=...)``.

    The structured variant of Wanda (Sun et al. 2023, §5): input feature j of
    a weight W scores ‖W_{:,j}‖₂·‖X_j‖₂ (column norm times input norm); a
    channel's score sums that over the members of its group where the channel
    is an input feature (the consumer side: the next layer's input channels,
    the attention output projection's heads). A group with no such member
    falls back to the L2 norm of its members' slices.

    Args:
      stats: ``jaxprune.calibrate(...)`` output (``gram=False`` is enough).

    Returns:
      ``(group, leaves, grads) -> np.ndarray`` of length ``group.size``.
    """
    from jaxprune.structured.importance import channel_sums, group_importance, resolve_path

    paths = list(stats)

    def importance(group, leaves, grads) -> np.ndarray:
        total = np.zeros(group.size)
        found = False
        for m, (path, axis) in enumerate(group.members):
            k = resolve_path(path, paths)
            st = stats[paths[k]] if k is not None else None
            if st is None or axis not in st.in_axes:
                continue
            w = jnp.asarray(leaves[path], jnp.float32)
            mat = to_matrix(w, st)
            col = jnp.sqrt(jnp.sum(mat * mat, axis=-2)) * jnp.sqrt(st.sq_norm)  # (*groups, cols)
            in_shape = [w.shape[a] for a in st.in_axes]
            per_in = col.reshape(*col.shape[:-1], *in_shape)
            total += np.asarray(channel_sums(per_in, per_in.ndim - len(in_shape)
                                             + st.in_axes.index(axis), group.layouts[m],
                                             group.size), np.float64)
            found = True
        if not found:
            return group_importance(leaves, [group], "l2")[0]
        return total

    return importance
