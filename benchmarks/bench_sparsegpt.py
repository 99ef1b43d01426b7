"""SparseGPT on one layer: jitted JAX (jaxprune.sparsegpt) vs plain NumPy/SciPy.

Both run the same algorithm (Frantar & Alistarh 2023, arXiv 2301.00774):
dampened inverse-Hessian Cholesky, blocks of 128 columns, adaptive mask per
block, lazy batched updates; both in float32, on the same layer and Gram
matrix, in the same run. The paper's setting is a 4096x4096 layer with 128
calibration sequences; the calibration tokens only enter through the Gram
matrix, whose accumulation is timed separately.

    python benchmarks/bench_sparsegpt.py                 # 2048 x 2048, 128 x 32 tokens
    python benchmarks/bench_sparsegpt.py --size 4096     # the paper's layer size (slow)
    python benchmarks/bench_sparsegpt.py --quick         # 256 x 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def sparsegpt_numpy(w: np.ndarray, gram: np.ndarray, sparsity: float = 0.5, nm=None,
                    blocksize: int = 128, percdamp: float = 0.01):
    """The SparseGPT reference algorithm in NumPy/SciPy (float32), with the
    mask counts of ``jaxprune.sparsegpt``: exactly round(s·rows·end) -
    round(s·rows·start) entries pruned per block, ties by flat index.
    Returns (weights, keep mask)."""
    w = np.array(w, np.float32)
    h = 2.0 * np.array(gram, np.float32)
    rows, cols = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * np.mean(np.diag(h))
    h[np.diag_indices(cols)] += damp
    # Upper Cholesky factor of H⁻¹ as jaxprune computes it: one Cholesky of the
    # flipped H and one triangular inverse (U = P L⁻¹ P with PHP = LLᵀ).
    low = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
    u = scipy.linalg.solve_triangular(low, np.eye(cols, dtype=np.float32), lower=True)[::-1, ::-1]
    u = np.ascontiguousarray(u, np.float32)
    keep = np.ones_like(w, bool)
    done = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hb = u[i1:i2, i1:i2]
        d = np.diag(hb)
        k1 = np.ones_like(w1, bool)
        if nm is None:
            target = int(round(sparsity * rows * i2))
            score = (w1 ** 2 / d[None, :] ** 2).ravel()
            order = np.argsort(score, kind="stable")
            k1.ravel()[order[:target - done]] = False
            done = target
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                order = np.argsort(score, axis=1, kind="stable")[:, :m - n]
                np.put_along_axis(k1[:, i:i + m], order, False, axis=1)
            col = w1[:, i]
            q = np.where(k1[:, i], col, 0.0)
            err = (col - q) / d[i]
            w1[:, i:] -= np.outer(err, hb[i, i:])
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = k1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return np.where(keep, w, 0.0), keep


def correlated_inputs(n_tokens: int, cols: int, seed: int = 0) -> np.ndarray:
    """Inputs with strongly correlated features (a quarter as many latent
    factors, plus 10% noise) and uneven scales, like a transformer's."""
    rng = np.random.default_rng(seed)
    k = max(cols // 4, 1)
    mix = rng.standard_normal((k, cols)).astype(np.float32) / np.sqrt(k)
    latent = rng.standard_normal((n_tokens, k)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((n_tokens, cols)).astype(np.float32)
    scale = np.exp(rng.standard_normal(cols)).astype(np.float32)
    return (latent @ mix + noise) * scale


def run(quick: bool = False, size: Optional[int] = None, sequences: int = 128,
        seqlen: int = 32, repeats: Optional[int] = None) -> str:
    """Markdown: seconds per layer of jaxprune.sparsegpt vs the NumPy/SciPy
    reference (interleaved), mask agreement and output errors."""
    import jax
    import jax.numpy as jnp

    import harness
    from jaxprune.sparsegpt import sparsegpt

    n = size or (256 if quick else 2048)
    repeats = repeats or (2 if quick else 3)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, n)).astype(np.float32) / np.sqrt(n)
    x = correlated_inputs(sequences * seqlen, n)
    t = time.perf_counter()
    gram = x.T @ x
    t_gram = time.perf_counter() - t
    wj, gj = jnp.asarray(w), jnp.asarray(gram)
    rows = []
    for label, kw in (("50% unstructured", dict(sparsity=0.5)), ("2:4", dict(nm=(2, 4)))):
        t = time.perf_counter()
        jax.block_until_ready(sparsegpt(wj, gj, **kw))
        compile_s = time.perf_counter() - t
        res = {}
        times = harness.interleaved({
            "jax": lambda: res.__setitem__("jax", jax.block_until_ready(sparsegpt(wj, gj, **kw))),
            "numpy": lambda: res.__setitem__("numpy", sparsegpt_numpy(w, gram, **kw))},
            repeats, warmup=0)
        r, (ref_w, ref_keep) = res["jax"], res["numpy"]
        agree = float(np.mean(np.asarray(r.mask) == ref_keep))
        err_j = float(np.linalg.norm((np.asarray(r.weights) - w) @ x[:512].T))
        err_n = float(np.linalg.norm((ref_w - w) @ x[:512].T))
        rows.append([label, harness.secs(times["jax"]), f"{compile_s:.2f}",
                     harness.secs(times["numpy"]),
                     f"{harness.ratio(times['numpy'], times['jax']):.2f}x", f"{agree:.4%}",
                     f"{err_j:.4g} / {err_n:.4g}"])
    return "\n".join([
        "## SparseGPT: jitted JAX vs NumPy/SciPy", "",
        f"One {n} x {n} layer, {sequences} calibration sequences x {seqlen} tokens (Gram matrix "
        f"in NumPy: {t_gram:.2f} s, not included), the same algorithm (Frantar & Alistarh 2023; "
        "blocks of 128 columns, lazy batched updates) in float32 both ways. Seconds per layer, "
        f"median (min–max) of {repeats} interleaved runs; the first JAX call (compile "
        "included) is shown apart. Output error: ‖(W′ − W) X‖ on 512 tokens.", "",
        harness.table(["pattern", "jax s", "jax first call s", "numpy/scipy s", "speed-up",
                       "masks agree", "output error jax / numpy"], rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None, help="rows = columns (default 2048)")
    ap.add_argument("--sequences", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a 256 x 256 layer")
    args = ap.parse_args()
    print(run(args.quick, args.size, args.sequences, args.seqlen, args.repeats))


if __name__ == "__main__":
    main()
