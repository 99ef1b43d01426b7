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
from typing import NamedTuple, Optional

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

    U comes from one Cholesky factorisation and one triangular inverse: with
    P the exchange matrix and PHP = L Lᵀ, H = R Rᵀ for the upper triangular
    R = PLP, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = P L⁻¹ P.
    """
    n = h.shape[-1]
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(h.dtype))
    base = percdamp * jnp.mean(jnp.diagonal(h))
    base = jnp.where(base > 0, base, 1.0)
    eye = jnp.eye(n, dtype=h.dtype)

    def factor(damp):
        lower = jnp.linalg.cholesky((h + damp * eye)[::-1, ::-1])
        inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
        return inv[::-1, ::-1]

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
    h = 2.0 * gram.astype(jnp.float32)
    u, damp, dead = dampened_inverse_cholesky(h, percdamp)
    pad = padded - cols
    # Columns are rows of the transposed weights here: a column step reads and
    # writes contiguous memory.
    wt = jnp.pad(jnp.where(dead[:, None], 0.0, weights.astype(jnp.float32).T), ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(padded) >= cols).astype(jnp.float32)
    valid = jnp.arange(padded) < cols
    counts = jnp.asarray(_block_prune_counts(rows, cols, padded, block, sparsity)
                         if nm is None else np.zeros(padded // block, np.int32))

    # Two levels of lazy updates: column steps touch only a sub-block of
    # ``sub`` columns; each finished sub-block updates the rest of its block in
    # one matmul, each finished block the rest of the matrix.
    limit = min(block, 16 if nm is None else max(16, m))
    sub = max(d for d in range(1, limit + 1) if block % d == 0 and (nm is None or d % m == 0))

    def columns(w1, keep1, hb, d2):
        """OBS steps for the columns (rows of ``w1``) of one sub-block, left
        to right; with N:M the mask of each group of m columns is chosen when
        its first column is reached, from the weights as updated so far."""
        def one(j, carry):
            w1, keep1, err1, loss = carry
            if nm is not None:
                g0 = j - j % m
                score = (jnp.square(lax.dynamic_slice_in_dim(w1, g0, m, 0))
                         / lax.dynamic_slice_in_dim(d2, g0, m)[:, None])
                chosen = mask_lib.n_of_m({"s": score}, n, m, axis=0, where=lambda *_: True)["s"]
                old = lax.dynamic_slice_in_dim(keep1, g0, m, 0)
                keep1 = lax.dynamic_update_slice_in_dim(keep1, jnp.where(j % m == 0, chosen, old), g0, 0)
            col = lax.dynamic_index_in_dim(w1, j, 0, keepdims=False)
            q = jnp.where(lax.dynamic_index_in_dim(keep1, j, 0, keepdims=False), col, 0.0)
            err = (col - q) / hb[j, j]
            w1 = w1 - lax.dynamic_index_in_dim(hb, j, 0, keepdims=False)[:, None] * err[None, :]
            w1 = lax.dynamic_update_index_in_dim(w1, q, j, 0)
            err1 = lax.dynamic_update_index_in_dim(err1, err, j, 0)
            return w1, keep1, err1, loss + err * err / 2
        return lax.fori_loop(0, w1.shape[0], one,
                             (w1, keep1, jnp.zeros_like(w1), jnp.zeros(rows, jnp.float32)))

    def sub_block(s, carry):
        w1, keep1, err1, hb, d2, loss = carry
        j0 = s * sub
        hs = lax.dynamic_slice_in_dim(hb, j0, sub, 0)
        ws, ks, es, ls = columns(lax.dynamic_slice_in_dim(w1, j0, sub, 0),
                                 lax.dynamic_slice_in_dim(keep1, j0, sub, 0),
                                 lax.dynamic_slice_in_dim(hs, j0, sub, 1),
                                 lax.dynamic_slice_in_dim(d2, j0, sub))
        w1 = w1 - jnp.matmul(hs.T, es, precision=lax.Precision.HIGHEST)
        w1 = lax.dynamic_update_slice_in_dim(w1, ws, j0, 0)
        keep1 = lax.dynamic_update_slice_in_dim(keep1, ks, j0, 0)
        err1 = lax.dynamic_update_slice_in_dim(err1, es, j0, 0)
        return w1, keep1, err1, hb, d2, loss + ls

    def one_block(b, carry):
        wt, keept, loss = carry
        i1 = b * block
        w1 = lax.dynamic_slice_in_dim(wt, i1, block, 0)
        hrows = lax.dynamic_slice_in_dim(u, i1, block, 0)
        hb = lax.dynamic_slice_in_dim(hrows, i1, block, 1)
        d2 = jnp.square(jnp.diagonal(hb))
        if nm is None:  # adaptive mask of the whole block, from the weights updated so far
            ok = lax.dynamic_slice_in_dim(valid, i1, block)
            score = jnp.square(w1.T) / d2[None, :]  # (rows, block): ties go by row-major index
            keep1 = ~threshold.lowest([score], counts[b],
                                      kept=[jnp.broadcast_to(ok[None, :], score.shape)])[0].T
        else:
            keep1 = jnp.ones(w1.shape, bool)
        w1, keep1, err1, _, _, loss = lax.fori_loop(
            0, block // sub, sub_block, (w1, keep1, jnp.zeros_like(w1), hb, d2, loss))
        # Lazy update of every later column at once (U is upper triangular, so
        # earlier columns are untouched; this block is overwritten next).
        wt = wt - jnp.matmul(hrows.T, err1, precision=lax.Precision.HIGHEST)
        wt = lax.dynamic_update_slice_in_dim(wt, w1, i1, 0)
        keept = lax.dynamic_update_slice_in_dim(keept, keep1, i1, 0)
        return wt, keept, loss

    wt, keept, loss = lax.fori_loop(0, padded // block, one_block,
                                    (wt, jnp.zeros(wt.shape, bool), jnp.zeros(rows, jnp.float32)))
    w, keep = wt.T, keept.T
    keep = keep[:, :cols]
    return SparseGPTResult(jnp.where(keep, w[:, :cols], 0.0), keep, damp, dead, loss)
