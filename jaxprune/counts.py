"""The one count rule: how many of ``n`` entries a sparsity prunes.

``prune_count(s, n)`` rounds the sparsity to float32, then rounds the EXACT
product ``float32(s) * n`` half to even. Every part of jaxprune counts this
way (eager masks, ``jit``, the optax transformations, sparse training,
lottery rounds, structured selection), so a Python ``0.9`` and a traced
``0.9`` prune the same number of entries. ``prune_counts`` and
``prune_count_vector`` apply it to many leaves with one vectorised product.
Re-exported by ``jaxprune.threshold``, where it is documented.
"""

from __future__ import annotations

import fractions
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["prune_count", "prune_counts", "prune_count_vector"]


def prune_count(sparsity: Union[float, jax.Array], n: Union[int, jax.Array]) -> Union[int, jax.Array]:
    """How many of ``n`` entries a sparsity prunes: the one count rule of jaxprune.

    The sparsity is first rounded to float32 (as every traced value already
    is), then the EXACT product ``float32(sparsity) * n`` is rounded half to
    even. Eager calls, ``jit``, the optax transformations, sparse training,
    lottery rounds and structured selection all count this way, so a Python
    ``0.9`` and a traced ``0.9`` prune the same number of entries.

    A Python/NumPy sparsity with a Python ``n`` gives a Python int (computed
    with ``fractions``). Otherwise (traced sparsity or ``n``) the product of
    the 24-bit significand and ``n`` is formed in two uint32 words and
    rounded by its bits: exact for every ``n < 2**32`` on every backend,
    without float64. A traced sparsity is clipped to [0, 1] (NaN counts as
    0); callers validate it first (``jaxprune.allocation.check_sparsity``).

    >>> prune_count(0.9, 35), prune_count(0.5, 5), prune_count(0.35, 10)
    (31, 2, 3)
    >>> import jax.numpy as jnp
    >>> int(prune_count(jnp.float32(0.9), 35))
    31
    """
    static_n = isinstance(n, (int, np.integer))
    if static_n and isinstance(sparsity, (int, float, np.integer, np.floating)) \
            and not isinstance(sparsity, (bool, np.bool_)):
        s = np.float32(sparsity)
        if not 0.0 <= s <= 1.0:  # also NaN
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        return round(fractions.Fraction(float(s)) * int(n))
    s = jnp.asarray(sparsity, jnp.float32)
    s = jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))
    # A Python n is converted straight to uint32: through int32 (jnp.asarray's
    # default) every n >= 2**31 would overflow.
    n = jnp.asarray(n, jnp.uint32) if static_n else jnp.asarray(n).astype(jnp.uint32)
    return _exact_round_product(s, n)


def _check_lengths(sparsities, sizes) -> None:
    if len(sparsities) != len(sizes):
        raise ValueError(f"sparsities has {len(sparsities)} entries but sizes has {len(sizes)}: "
                         "one sparsity per size is needed")


def prune_count_vector(sparsities: Sequence[Union[float, jax.Array]],
                       sizes: Sequence[int]) -> jax.Array:
    """``prune_count(s, n)`` for every pair, as one uint32 vector computed by
    one vectorised exact product (the same rule: float32 sparsity, exact
    product, round half to even; sparsities clipped to [0, 1], NaN counts
    0). Sparsities that are the same object are converted once."""
    _check_lengths(sparsities, sizes)
    distinct, where, idx = [], {}, []
    for s in sparsities:
        if id(s) not in where:
            where[id(s)] = len(distinct)
            distinct.append(s)
        idx.append(where[id(s)])
    s = jnp.stack([jnp.asarray(v, jnp.float32) for v in distinct])
    s = jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))
    s = s[np.asarray(idx)] if len(distinct) > 1 else jnp.broadcast_to(s[0], (len(idx),))
    n = (jnp.asarray(np.asarray(sizes, np.uint32)) if all(isinstance(v, (int, np.integer)) for v in sizes)
         else jnp.stack([jnp.asarray(v).astype(jnp.uint32) for v in sizes]))
    return _exact_round_product(s, n)


def prune_counts(sparsities: Sequence[Union[float, jax.Array]],
                 sizes: Sequence[int]) -> list[Union[int, jax.Array]]:
    """``[prune_count(s, n) for s, n in zip(sparsities, sizes)]`` with all
    traced sparsities counted by one vectorised ``_exact_round_product``:
    under ``jit`` the program holds the ~100-op count once, not once per
    leaf (128 leaves made it two thirds of a mask update's program).
    Sparsities that are the same object are converted once."""
    _check_lengths(sparsities, sizes)
    out: list = [None] * len(sizes)
    traced = []
    for i, (s, n) in enumerate(zip(sparsities, sizes)):
        if isinstance(n, (int, np.integer)) and isinstance(
                s, (int, float, np.integer, np.floating)) and not isinstance(s, (bool, np.bool_)):
            out[i] = prune_count(s, n)
        else:
            traced.append(i)
    if len(traced) == 1:
        out[traced[0]] = prune_count(sparsities[traced[0]], sizes[traced[0]])
    elif traced:
        counts = prune_count_vector([sparsities[i] for i in traced], [sizes[i] for i in traced])
        for j, i in enumerate(traced):
            out[i] = counts[j]
    return out


@jax.jit  # one small program, not ~60 eager ops
def _exact_round_product(s: jax.Array, n: jax.Array) -> jax.Array:
    """``round_half_even(s * n)`` for a float32 ``s`` in [0, 1] and a uint32
    ``n``, exactly, in uint32 arithmetic.

    ``s = m * 2**-k`` with a 24-bit integer ``m`` and ``k >= 23``; the 56-bit
    product ``m * n`` is built from 16-bit limbs in two words ``(hi, lo)``,
    and the result is ``(m * n) >> k`` plus one when the bits shifted out are
    above one half, or exactly one half and the quotient is odd.
    """
    u32 = jnp.uint32
    bits = lax.bitcast_convert_type(s, u32)
    exponent = (bits >> 23) & u32(0xFF)
    m = jnp.where(exponent == 0, bits & u32(0x7FFFFF), (bits & u32(0x7FFFFF)) | u32(0x800000))
    k = jnp.where(exponent == 0, u32(149), u32(150) - exponent)  # s = m * 2**-k
    # 32 x 32 -> 64-bit product from 16-bit limbs (every partial product fits in 32 bits).
    m1, m0, n1, n0 = m >> 16, m & u32(0xFFFF), n >> 16, n & u32(0xFFFF)
    p00, p01, p10, p11 = m0 * n0, m0 * n1, m1 * n0, m1 * n1
    mid = (p00 >> 16) + (p01 & u32(0xFFFF)) + (p10 & u32(0xFFFF))
    lo = (p00 & u32(0xFFFF)) | (mid << 16)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)

    def shifted(j):  # low word of (hi, lo) >> j, for 1 <= j <= 63 (0 beyond)
        small = jnp.minimum(j, u32(31))
        below32 = (lo >> small) | jnp.where(j == 0, u32(0), hi << (u32(32) - jnp.maximum(small, u32(1))))
        above32 = hi >> (jnp.clip(j, u32(32), u32(63)) - u32(32))
        return jnp.where(j < 32, below32, jnp.where(j < 64, above32, u32(0)))

    def any_below(j):  # any of the lowest j bits of (hi, lo) set, for 1 <= j <= 63
        lo_mask = jnp.where(j >= 32, u32(0xFFFFFFFF), (u32(1) << jnp.minimum(j, u32(31))) - u32(1))
        hi_mask = jnp.where(j <= 32, u32(0), (u32(1) << (jnp.clip(j, u32(32), u32(63)) - u32(32))) - u32(1))
        return ((lo & lo_mask) | (hi & hi_mask)) != 0

    # k >= 57 means s * n < 2**56 * 2**-57 = 1/2: the count is 0.
    q = jnp.where(k >= 57, u32(0), shifted(k))
    half = jnp.where(k >= 57, u32(0), shifted(k - u32(1)) & u32(1))
    sticky = any_below(jnp.minimum(k - u32(1), u32(63)))
    up = (half == 1) & (sticky | ((q & u32(1)) == 1))
    return q + up.astype(u32)
