"""Exact k-smallest selection over many arrays without sorting or concatenating.

Floats are mapped to unsigned integers whose order matches the float order
(the "order-preserving key"); the k-th smallest key is then found by a radix
select: one 16-bit histogram pass per 16 key bits, each pass reducing per leaf
and summing the histograms across leaves. Cost is O(N) per pass, memory is one
65,536-bin histogram, and per-leaf reductions partition across devices when a
leaf is sharded. Ties at the threshold are broken by leaf order, then flat
index, with one extra cumulative-count pass that runs only when the tie must
be split.

NaN ranks lowest (below -inf): a NaN score is pruned first.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["order_keys", "max_key", "lowest", "prune_count"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


def order_keys(x: jax.Array, wide: bool = False) -> jax.Array:
    """Maps floats to unsigned ints with the same order (NaN lowest, -0 == +0).

    ``wide=True`` gives uint64 keys (needed when any score is float64).

    >>> import jax.numpy as jnp
    >>> k = order_keys(jnp.array([1.0, -1.0, 0.0, jnp.nan, jnp.inf]))
    >>> [int(i) for i in jnp.argsort(k)]
    [3, 1, 2, 0, 4]
    """
    fdt, udt = (jnp.float64, jnp.uint64) if wide else (jnp.float32, jnp.uint32)
    bits_n = 64 if wide else 32
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(fdt)
    x = x.astype(fdt)
    # NaN -> lowest key below -inf; +0.0 so that -0.0 and 0.0 tie.
    nan = jnp.isnan(x)
    x = jnp.where(nan, 0.0, x) + 0.0
    bits = lax.bitcast_convert_type(x, udt)
    sign = bits >> (bits_n - 1)
    top = udt(1) << (bits_n - 1)
    keys = jnp.where(sign == 1, ~bits, bits | top)
    # -inf has key 0x007FFFFF...; NaN gets 0, strictly below it.
    return jnp.where(nan, udt(0), keys)


def max_key(wide: bool = False):
    """The largest key: above every float, used to protect entries."""
    return jnp.iinfo(jnp.uint64 if wide else jnp.uint32).max


def prune_count(sparsity: Union[float, jax.Array], n: int) -> Union[int, jax.Array]:
    """``round(sparsity * n)`` (half to even, like Python's ``round``).

    A Python float gives a Python int computed in float64; a traced sparsity
    gives an int32 array computed in float32.
    """
    if isinstance(sparsity, (int, float)):
        return int(round(float(sparsity) * n))
    s = jnp.asarray(sparsity, jnp.float32)
    return jnp.round(jnp.clip(s, 0.0, 1.0) * n).astype(jnp.int32)


def _histogram(keys: jax.Array, shift: int, prefix, prefix_shift: int, count_dt) -> jax.Array:
    digit = ((keys >> shift) & (_BINS - 1)).astype(jnp.int32)
    if prefix_shift >= keys.dtype.itemsize * 8:
        ones = jnp.ones((), count_dt)
        return jnp.zeros(_BINS, count_dt).at[digit].add(ones)
    match = (keys >> prefix_shift) == (prefix >> prefix_shift)
    return jnp.zeros(_BINS, count_dt).at[digit].add(match.astype(count_dt))


def _kth_key(keys: Sequence[jax.Array], rank):
    """Key of the entry of 0-based ``rank`` in ascending order, the number of
    entries strictly below it, and the number equal to it."""
    udt = keys[0].dtype
    bits_n = udt.itemsize * 8
    count_dt = jnp.uint32
    prefix = jnp.zeros((), udt)
    remaining = jnp.asarray(rank, count_dt)
    below = jnp.zeros((), count_dt)
    equal = jnp.zeros((), count_dt)
    for shift in range(bits_n - _DIGIT_BITS, -1, -_DIGIT_BITS):
        prefix_shift = shift + _DIGIT_BITS
        hist = sum(_histogram(k, shift, prefix, prefix_shift, count_dt) for k in keys)
        cum = jnp.cumsum(hist)
        digit = jnp.searchsorted(cum, remaining, side="right")
        before = jnp.where(digit > 0, cum[jnp.maximum(digit - 1, 0)], 0).astype(count_dt)
        remaining = remaining - before
        below = below + before
        prefix = prefix | (digit.astype(udt) << shift)
        equal = hist[digit]  # last pass: entries whose every digit matches
    return prefix, below, equal


def lowest(keys: Sequence[jax.Array], n_prune) -> list[jax.Array]:
    """Boolean "pruned" arrays marking exactly ``n_prune`` smallest keys.

    Args:
      keys: unsigned key arrays from ``order_keys`` (any shapes, one dtype).
      n_prune: how many entries to mark, ``0 <= n_prune <= total size``
        (Python int or traced int).

    Ties are broken by position in ``keys``, then by flat index: the earlier
    entry is pruned first.

    Returns:
      One bool array per input, True where pruned.
    """
    keys = list(keys)
    total = sum(k.size for k in keys)
    if total >= 2**32:
        raise ValueError(f"cannot select among {total} entries (limit 2**32 - 1)")
    if isinstance(n_prune, int):
        if n_prune <= 0:
            return [jnp.zeros(k.shape, bool) for k in keys]
        if n_prune >= total:
            return [jnp.ones(k.shape, bool) for k in keys]
    n_prune = jnp.clip(jnp.asarray(n_prune), 0, total).astype(jnp.uint32)
    rank = jnp.maximum(n_prune, 1) - 1
    t, below, ties_total = _kth_key(keys, rank)
    ties_needed = n_prune - below  # >= 1 when n_prune >= 1

    def take_all_ties():
        return [k <= t for k in keys]

    def split_ties():
        out, offset = [], jnp.zeros((), jnp.uint32)
        for k in keys:
            eq = (k == t).reshape(-1)
            order = jnp.cumsum(eq, dtype=jnp.uint32) + offset  # 1-based tie rank
            chosen = eq & (order <= ties_needed)
            out.append((k < t) | chosen.reshape(k.shape))
            offset = offset + jnp.sum(eq, dtype=jnp.uint32)
        return out

    pruned = lax.cond(ties_needed == ties_total, take_all_ties, split_ties)
    return [p & (n_prune > 0) for p in pruned]
