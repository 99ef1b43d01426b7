"""Exact k-smallest selection over many arrays without sorting or concatenating.

Floats are mapped to unsigned integers whose order matches the float order
(the "order-preserving key"); the k-th smallest key is then found by a radix
select: one 16-bit histogram pass per 16 key bits, each pass reducing per leaf
and summing the histograms across leaves. Cost is O(N) per pass, memory is one
65,536-bin histogram (keys are recomputed inside each pass, never stored), and
per-leaf reductions partition across devices when a leaf is sharded: only
histograms cross devices. Ties at the threshold are broken by leaf order, then
flat index, by a second radix select over positions that runs only when a tie
must be split.

NaN ranks lowest (below -inf): a NaN score is pruned first.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["order_keys", "lowest", "prune_count"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_NO_POSITION = np.uint32(np.iinfo(np.uint32).max)


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
    x = jnp.asarray(x).astype(fdt)
    nan = jnp.isnan(x)
    bits = lax.bitcast_convert_type(x, udt)
    top = udt(1) << (bits_n - 1)
    # -0.0 ties with +0.0; done on the bits because float arithmetic on CPU
    # flushes denormals to zero and would merge them with 0.
    bits = jnp.where(bits == top, udt(0), bits)
    keys = jnp.where((bits >> (bits_n - 1)) == 1, ~bits, bits | top)
    # -inf maps to 0x007FFFFF...; NaN gets 0, strictly below it.
    return jnp.where(nan, udt(0), keys)


def prune_count(sparsity: Union[float, jax.Array], n: int) -> Union[int, jax.Array]:
    """``round(sparsity * n)``, half to even like Python's ``round``.

    A Python float gives a Python int. A traced sparsity is a float32 scalar;
    its product with ``n`` is rounded exactly (in float64 scalar arithmetic,
    except on TPU where float32 is used and the count may be off by up to
    ``n * 2**-24``), after clipping to [0, 1].
    """
    if isinstance(sparsity, (int, float, np.number)):
        return int(round(float(sparsity) * n))
    s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    if jax.default_backend() != "tpu":
        with _x64():
            return jnp.round(s.astype(jnp.float64) * n).astype(jnp.uint32)
    return jnp.round(s * n).astype(jnp.uint32)


def _x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX
    return enable_x64()


def _scatter_count(digit: jax.Array, weight, count_dt) -> jax.Array:
    """Histogram of ``digit`` (any shape, never reshaped so that a sharded
    leaf is counted shard by shard and only histograms are all-reduced)."""
    hist = jnp.zeros(_BINS, count_dt)
    mesh = getattr(getattr(jax.typeof(digit), "sharding", None), "mesh", None)
    explicit = mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:  # sharding-in-types needs the (replicated) result sharding spelled out
        with jax.sharding.use_abstract_mesh(mesh):
            return hist.at[digit].add(weight, out_sharding=jax.sharding.PartitionSpec())
    return hist.at[digit].add(weight)


_CHUNK = 1 << 18  # entries counted per scatter: keeps its index buffers in cache


def _shard_counts(x: jax.Array) -> Optional[tuple]:
    """Devices along each axis of an explicitly sharded array, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not any(
            t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    counts = []
    for entry in spec:
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        counts.append(int(np.prod([mesh.shape[n] for n in names])) if names else 1)
    return tuple(counts)


def _chunking(shape: tuple, shards: Optional[tuple] = None) -> tuple[int, int]:
    """(axis, k): count a leaf in ``k`` strided chunks along ``axis``.

    Chunk ``j`` holds the slices ``j, j + k, j + 2k, ...`` of ``axis``, so on a
    sharded axis each chunk has rows on every device: devices slice their own
    data and only the small histogram is reduced. The outermost axis that can
    be split finely enough is used, so each slice is a long contiguous run.
    With ``shards`` (devices per axis of an explicitly sharded leaf) an axis
    is split only if every chunk still divides evenly over its devices:
    sharding-in-types cannot reshape ``n@x`` into ``(n // k, k)`` otherwise.
    """
    size = int(np.prod(shape)) if shape else 1
    if size <= _CHUNK:
        return 0, 1
    fallback = (0, 1)
    for axis, n in enumerate(shape):
        divisors = [d for d in range(2, n + 1)
                    if n % d == 0 and (shards is None or (n // d) % shards[axis] == 0)]
        fitting = [d for d in divisors if size // d <= _CHUNK]
        if fitting:
            return axis, fitting[0]
        if divisors and divisors[-1] > fallback[1]:
            fallback = (axis, divisors[-1])
    return fallback


def _histogram(make_keys, leaf: int, shift: int, prefix, prefix_shift: int) -> jax.Array:
    """Histogram of the 16-bit digit at ``shift`` of one leaf's keys, counting
    only keys whose higher bits equal ``prefix``."""
    count_dt = jnp.uint32

    def count(keys):
        digit = ((keys >> shift) & (_BINS - 1)).astype(jnp.int32)
        if prefix_shift >= keys.dtype.itemsize * 8:
            return _scatter_count(digit, jnp.ones((), count_dt), count_dt)
        match = (keys >> prefix_shift) == (prefix >> prefix_shift)
        return _scatter_count(digit, match.astype(count_dt), count_dt)

    shape = make_keys.shapes[leaf]
    axis, k = _chunking(shape, _shard_counts(make_keys.arrays[leaf]))
    if k == 1:
        return count(make_keys(leaf))

    def body(j, hist):
        return hist + count(make_keys(leaf, axis, k, j))

    return lax.fori_loop(0, k, body, jnp.zeros(_BINS, count_dt))


def _kth_key(make_keys, rank):
    """Key of the entry of 0-based ``rank`` in ascending order, the number of
    entries strictly below it, and the number equal to it.

    ``make_keys(i, ...)`` rebuilds leaf ``i``'s keys (or one chunk of them);
    rebuilding them in each pass lets XLA fuse the key computation into the
    histogram instead of storing keys.
    """
    udt = make_keys.dtype
    bits_n = udt.itemsize * 8
    prefix = jnp.zeros((), udt)
    remaining = jnp.asarray(rank, jnp.uint32)
    below = jnp.zeros((), jnp.uint32)
    equal = jnp.zeros((), jnp.uint32)
    for shift in range(bits_n - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = sum(_histogram(make_keys, i, shift, prefix, shift + _DIGIT_BITS)
                   for i in range(len(make_keys.shapes)))
        cum = jnp.cumsum(hist)
        digit = jnp.searchsorted(cum, remaining, side="right")
        before = jnp.where(digit > 0, cum[jnp.maximum(digit - 1, 0)], 0).astype(jnp.uint32)
        remaining = remaining - before
        below = below + before
        prefix = prefix | (digit.astype(udt) << shift)
        equal = hist[digit]  # after the last pass: entries equal in every digit
    return prefix, below, equal


def _flat_index(full_shape: tuple, offset: int, chunk=None) -> jax.Array:
    """``offset + row-major flat index`` of every entry of a leaf of
    ``full_shape``, or of its strided chunk ``(axis, k, j)`` (rows ``j::k``
    of ``axis``); built from iotas so that
    nothing parameter-sized is stored and a sharded leaf stays sharded."""
    shape = list(full_shape)
    start = None
    if chunk is not None:
        axis, k, j = chunk
        shape[axis] //= k
        start = (axis, k, jnp.asarray(j).astype(jnp.uint32))
    index = jnp.full(shape, offset, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        coord = lax.broadcasted_iota(jnp.uint32, tuple(shape), dim)
        if start is not None and start[0] == dim:  # row r of chunk j is row r * k + j
            coord = coord * jnp.uint32(start[1]) + start[2]
        index = index + coord * jnp.uint32(stride)
        stride *= full_shape[dim]
    return index


def lowest(scores: Sequence[jax.Array], n_prune,
           protected: Optional[Sequence[Optional[jax.Array]]] = None,
           demoted: Optional[Sequence[Optional[jax.Array]]] = None) -> list[jax.Array]:
    """Boolean "pruned" arrays marking exactly the ``n_prune`` lowest scores.

    Args:
      scores: float arrays of any shapes and float dtypes (float64 scores use
        64-bit keys). NaN ranks lowest.
      n_prune: how many entries to mark (Python int or traced int), clipped to
        ``[0, total - protected]``.
      protected: optional bool arrays (or None) aligned with ``scores``; True
        entries rank above everything and are pruned only if nothing else is
        left.
      demoted: optional bool arrays (or None); True entries rank lowest, like
        NaN (e.g. already-pruned weights, so that masks nest), without the
        cost of writing NaN into a copy of the scores.

    Ties are broken by position in ``scores``, then by flat index: the earlier
    entry is pruned first.

    Returns:
      One bool array per input, True where pruned.

    >>> import jax.numpy as jnp
    >>> [m.tolist() for m in lowest([jnp.array([3.0, 1.0]), jnp.array([1.0, 0.5])], 2)]
    [[False, True], [False, True]]
    """
    scores = [jnp.asarray(s) for s in scores]
    total = sum(s.size for s in scores)
    if total >= 2**32:
        raise ValueError(f"cannot select among {total} entries (limit 2**32 - 1)")
    if isinstance(n_prune, (int, np.integer)):
        if n_prune <= 0:  # *_like: the result keeps each score's sharding
            return [jnp.zeros_like(s, dtype=bool) for s in scores]
        if n_prune >= total and protected is None:
            return [jnp.ones_like(s, dtype=bool) for s in scores]
    protected = list(protected) if protected is not None else [None] * len(scores)
    demoted = list(demoted) if demoted is not None else [None] * len(scores)
    wide = any(jnp.dtype(s.dtype).itemsize > 4 for s in scores)
    n_prune = jnp.clip(jnp.asarray(n_prune), 0, total).astype(jnp.uint32)
    return _lowest(scores, protected, demoted, n_prune, wide)


def _chunk_of(x: jax.Array, chunk) -> jax.Array:
    """The strided chunk ``(axis, k, j)`` of ``x`` (see ``_chunking``)."""
    if chunk is None:
        return x
    axis, k, j = chunk
    split = x.reshape(*x.shape[:axis], x.shape[axis] // k, k, *x.shape[axis + 1:])
    return lax.dynamic_index_in_dim(split, j, axis + 1, keepdims=False)


class _Keys:
    """Rebuilds the order keys of leaf ``i`` (whole or one strided chunk)."""

    def __init__(self, arrays, transform):
        self.arrays, self.transform = arrays, transform
        self.shapes = [a.shape for a in arrays]
        self.dtype = jax.eval_shape(lambda a: transform(0, a), arrays[0]).dtype

    def __call__(self, i, axis=None, k=1, j=None):
        a = self.arrays[i]
        if k == 1:
            return self.transform(i, a)
        # Strided chunk j = rows j, j + k, j + 2k, ...: the split-off axis of
        # length k is unsharded, so every device slices its own rows (a
        # contiguous chunk would live on one shard and force an all-gather).
        return self.transform(i, _chunk_of(a, (axis, k, j)), chunk=(axis, k, j))


@functools.partial(jax.jit, static_argnames="wide")
def _lowest(scores, protected, demoted, n_prune, wide):
    # jitted so that eager callers compile once per set of shapes, not per op.
    top = np.iinfo(np.uint64 if wide else np.uint32).max

    def keys_of(i, a, chunk=None):
        k = order_keys(a, wide)
        if demoted[i] is not None:
            k = jnp.where(_chunk_of(demoted[i], chunk), k.dtype.type(0), k)
        if protected[i] is not None:
            k = jnp.where(_chunk_of(protected[i], chunk), k.dtype.type(top), k)
        return k

    make_keys = _Keys(scores, keys_of)
    rank = jnp.maximum(n_prune, 1) - 1
    t, below, ties_total = _kth_key(make_keys, rank)
    ties_needed = n_prune - below  # >= 1 when n_prune >= 1
    offsets = np.cumsum([0] + [s.size for s in scores]).tolist()

    def position_of(i, a, chunk=None):
        keys = keys_of(i, a, chunk)
        pos = _flat_index(scores[i].shape, offsets[i], chunk)
        return jnp.where(keys == t, pos, _NO_POSITION)

    # Position of the last tie to prune: all ties (common case, no extra pass)
    # or the (ties_needed)-th tie in (leaf, flat index) order.
    last = lax.cond(ties_needed == ties_total,
                    lambda: jnp.asarray(_NO_POSITION),
                    lambda: _kth_key(_Keys(scores, position_of), ties_needed - 1)[0])
    out = []
    for i, s in enumerate(scores):
        k = keys_of(i, s)
        pos = _flat_index(s.shape, offsets[i])
        out.append(((k < t) | ((k == t) & (pos <= last))) & (n_prune > 0))
    return out
