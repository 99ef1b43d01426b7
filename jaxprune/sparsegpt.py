"""SparseGPT: prune a weight matrix and reconstruct its output, in one shot.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot" (arXiv 2301.00774). For a layer ``y = W x`` with inputs
X, the layer-wise objective ‖WX − ŴX‖² has Hessian H = 2XXᵀ. Columns are
pruned left to right; pruning column j of a row changes that row's later
columns by the Optimal Brain Surgeon update ``-err_j · (H⁻¹)_{j,j:}``, with
``err_j = (w_j - q_j) / [H⁻¹]_jj``, read from the upper Cholesky factor U of
the dampened inverse Hessian (H + λI)⁻¹ = UᵀU, λ = percdamp · mean(diag H).
Updates inside a block of ``blocksize`` columns are applied column by column;
the block's accumulated errors update the remaining columns in one matmul
("lazy batch updates"). The mask is chosen adaptively: per block, the
entries with the lowest ``w² / U_jj²`` across all rows of the block
(unstructured), or per group of m columns of each row at the group's first
column (N:M), using the weights as updated so far.

Everything is one jitted computation: a ``fori_loop`` over blocks, and
inside it over columns; rows are vectorised.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import masks as mask_lib
from jaxprune import threshold

__all__ = ["SparseGPTResult", "sparsegpt", "dampened_inverse_cholesky"]


class SparseGPTResult(NamedTuple):
    """``weights``: the pruned, reconstructed matrix (pruned entries exactly 0);
    ``mask``: True where kept; ``damp``: the λ added to H's diagonal (NaN if
    H could not be factorised);
    ``dead``: input features that were always 0 (their H diagonal was 0, their
    weights are pruned first); ``loss``: Σ err²/2 per row (the OBS estimate
    of the increase of ‖WX − ŴX‖² / 2, in units of H)."""

    weights: jax.Array
    mask: jax.Array
    damp: jax.Array
    dead: jax.Array
    loss: jax.Array


def dampened_inverse_cholesky(h: jax.Array, percdamp: float = 0.01,
                              max_tries: int = 8) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹).

    Zero diagonal entries of H (inputs that are always 0) are set to 1 first,
    as in the SparseGPT reference code. λ starts at ``percdamp`` ·
    mean(diag H) and grows tenfold while the factorisation fails (a singular
    or indefinite H), at most ``max_tries`` times. Returns ``(U, λ, dead)``;
    λ is NaN if every attempt failed.
    """
    n = h.shape[-1]
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(h.dtype))
    base = percdamp * jnp.mean(jnp.diagonal(h))
    base = jnp.where(base > 0, base, 1.0)
    eye = jnp.eye(n, dtype=h.dtype)

    def factor(damp):
        lower = jnp.linalg.cholesky(h + damp * eye)
        inv = jax.scipy.linalg.cho_solve((lower, True), eye)
        return jnp.linalg.cholesky(inv).T

    def failed(u):
        return ~jnp.all(jnp.isfinite(u)) | ~jnp.all(jnp.diagonal(u) > 0)

    def cond(state):
        tries, _, u = state
        return (tries < max_tries) & failed(u)

    def body(state):
        tries, damp, _ = state
        return tries + 1, damp * 10.0, factor(damp * 10.0)

    _, damp, u = lax.while_loop(cond, body, (0, base, factor(base)))
    return u, jnp.where(failed(u), jnp.nan, damp), dead


def _block_prune_counts(rows: int, cols: int, padded: int, block: int, sparsity: float) -> np.ndarray:
    """Entries to prune in each block: round(s·rows·end) - round(s·rows·start),
    so that the blocks sum to exactly round(s·rows·cols); padding columns are
    added (they are pruned first and dropped)."""
    ends = np.minimum(np.arange(1, padded // block + 1) * block, cols)
    cum = np.array([threshold.prune_count(sparsity, rows * int(e)) for e in ends])
    per = np.diff(np.concatenate([[0], cum]))
    pad = rows * (np.arange(1, padded // block + 1) * block
                  - np.maximum(ends, np.arange(padded // block) * block))
    return (per + pad).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "blocksize", "percdamp"))
def sparsegpt(weights: jax.Array, gram: jax.Array, *, sparsity: float = 0.5,
              nm: Optional[tuple[int, int]] = None, blocksize: int = 128,
              percdamp: float = 0.01) -> SparseGPTResult:
    """Prunes ``weights`` (rows = outputs, columns = inputs) by SparseGPT.

    Args:
      weights: ``(rows, columns)``.
      gram: ``(columns, columns)``: XᵀX of the layer's calibration inputs
        (``jaxprune.calibrate``); H = 2·gram.
      sparsity: fraction pruned (unstructured): exactly
        ``round(sparsity · rows · columns)`` entries, spread over blocks.
      nm: ``(n, m)`` keeps exactly ``n`` of every ``m`` consecutive columns
        of each row instead (``sparsity`` is then ignored).
      blocksize: columns per lazy update / mask-selection block (128 in the
        paper); a multiple of ``m`` for N:M.
      percdamp: dampening λ = percdamp · mean(diag H).

    Returns:
      ``SparseGPTResult(weights, mask, damp, dead, loss)`` in float32.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> w = jax.random.normal(jax.random.key(1), (4, 8))
    >>> r = sparsegpt(w, x.T @ x, sparsity=0.5)
    >>> int(r.mask.sum()), bool(jnp.all(jnp.where(r.mask, True, r.weights == 0)))
    (16, True)
    """
    rows, cols = weights.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M needs columns divisible by m={m}, got {cols}")
        blocksize = max(m, blocksize // m * m)
    block = min(blocksize, cols)
    padded = -(-cols // block) * block
    w = weights.astype(jnp.float32)
    h = 2.0 * gram.astype(jnp.float32)
    u, damp, dead = dampened_inverse_cholesky(h, percdamp)
    w = jnp.where(dead[None, :], 0.0, w)
    pad = padded - cols
    w = jnp.pad(w, ((0, 0), (0, pad)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(padded) >= cols).astype(jnp.float32)
    valid = jnp.arange(padded) < cols
    counts = jnp.asarray(_block_prune_counts(rows, cols, padded, block, sparsity)
                         if nm is None else np.zeros(padded // block, np.int32))

    def columns(w1, keep1, hb, d2, loss):
        """OBS steps for the block's columns, left to right; with N:M the mask
        of each group of m columns is chosen when its first column is reached,
        from the weights as updated so far."""
        def one(j, carry):
            w1, keep1, err1, loss = carry
            if nm is not None:
                g0 = j - j % m
                score = (jnp.square(lax.dynamic_slice_in_dim(w1, g0, m, 1))
                         / lax.dynamic_slice_in_dim(d2, g0, m)[None, :])
                chosen = mask_lib.n_of_m({"s": score}, n, m, axis=1, where=lambda *_: True)["s"]
                old = lax.dynamic_slice_in_dim(keep1, g0, m, 1)
                keep1 = lax.dynamic_update_slice_in_dim(keep1, jnp.where(j % m == 0, chosen, old), g0, 1)
            col = lax.dynamic_index_in_dim(w1, j, 1, keepdims=False)
            q = jnp.where(lax.dynamic_index_in_dim(keep1, j, 1, keepdims=False), col, 0.0)
            err = (col - q) / hb[j, j]
            w1 = w1 - err[:, None] * lax.dynamic_index_in_dim(hb, j, 0, keepdims=True)
            w1 = lax.dynamic_update_index_in_dim(w1, q, j, 1)
            err1 = lax.dynamic_update_index_in_dim(err1, err, j, 1)
            return w1, keep1, err1, loss + err * err / 2
        return lax.fori_loop(0, block, one, (w1, keep1, jnp.zeros_like(w1), loss))

    def one_block(b, carry):
        w, keep, loss = carry
        i1 = b * block
        w1 = lax.dynamic_slice_in_dim(w, i1, block, 1)
        hrows = lax.dynamic_slice_in_dim(u, i1, block, 0)
        hb = lax.dynamic_slice_in_dim(hrows, i1, block, 1)
        d2 = jnp.square(jnp.diagonal(hb))
        if nm is None:  # adaptive mask of the whole block, from the weights updated so far
            ok = lax.dynamic_slice_in_dim(valid, i1, block)
            score = jnp.square(w1) / d2[None, :]
            keep1 = ~threshold.lowest([score], counts[b],
                                      kept=[jnp.broadcast_to(ok[None, :], score.shape)])[0]
        else:
            keep1 = jnp.ones(w1.shape, bool)
        w1, keep1, err1, loss = columns(w1, keep1, hb, d2, loss)
        # Lazy update of every later column at once (U is upper triangular, so
        # earlier columns are untouched; this block is overwritten next).
        w = w - jnp.matmul(err1, hrows, precision=lax.Precision.HIGHEST)
        w = lax.dynamic_update_slice_in_dim(w, w1, i1, 1)
        keep = lax.dynamic_update_slice_in_dim(keep, keep1, i1, 1)
        return w, keep, loss

    w, keep, loss = lax.fori_loop(0, padded // block, one_block,
                                  (w, jnp.zeros(w.shape, bool), jnp.zeros(rows, jnp.float32)))
    keep = keep[:, :cols]
    return SparseGPTResult(jnp.where(keep, w[:, :cols], 0.0), keep, damp, dead, loss)
