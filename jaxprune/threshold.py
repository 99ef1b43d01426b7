"""Exact k-smallest selection over many arrays without sorting or concatenating.

Floats are mapped to unsigned integers whose order matches the float order
(the "order-preserving key"); the k-th smallest key is then found by a radix
select: one 16-bit histogram pass per 16 key bits, each pass reducing per leaf
(large leaves chunk by chunk) and summing the histograms across leaves. Cost
is O(N) per pass, memory is one 65,536-bin histogram (keys are recomputed
inside each pass, never stored; scores may even be computed there, see
``lowest(elementwise=...)``), and
per-leaf reductions partition across devices when a leaf is sharded: only
histograms cross devices. Ties at the threshold are broken by leaf order, then
flat index: only when a tie must be split, one more pass counts ties per row
and one row per leaf finds where the cut falls.

NaN ranks lowest (below -inf): a NaN score is pruned first. Integer scores
are ranked exactly through keys built from their bits (``order_keys``).
How many entries a sparsity prunes is ``prune_count``, the one count rule.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import leaf_groups
from jaxprune.counts import prune_count, prune_count_vector, prune_counts

__all__ = ["order_keys", "lowest", "prune_count", "prune_counts", "prune_count_vector",
           "select_stacked_rows"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


def order_keys(x: jax.Array, wide: bool = False, signed: Optional[bool] = None) -> jax.Array:
    """Maps scores to unsigned ints with the same order.

    Floats: NaN lowest, -0 == +0. Integers are mapped exactly from their bits
    (a signed value has its sign bit flipped), never through a float, so
    ``[2**31 - 1, 2**31 - 2]`` stay distinct; ``signed`` overrides the
    mapping taken from the dtype (to rank unsigned and signed integers
    together). ``wide=True`` gives uint64 keys (needed when any score is
    64-bit).

    >>> import jax.numpy as jnp
    >>> k = order_keys(jnp.array([1.0, -1.0, 0.0, jnp.nan, jnp.inf]))
    >>> [int(i) for i in jnp.argsort(k)]
    [3, 1, 2, 0, 4]
    >>> [int(i) for i in jnp.argsort(order_keys(jnp.array([2**31 - 1, 2**31 - 2, -5])))]
    [2, 1, 0]
    """
    fdt, udt = (jnp.float64, jnp.uint64) if wide else (jnp.float32, jnp.uint32)
    bits_n = 64 if wide else 32
    x = jnp.asarray(x)
    top = udt(1) << (bits_n - 1)
    if jnp.issubdtype(x.dtype, jnp.integer):
        if signed is None:
            signed = jnp.issubdtype(x.dtype, jnp.signedinteger)
        if not signed:
            return x.astype(udt)
        sdt = jnp.int64 if wide else jnp.int32
        return lax.bitcast_convert_type(x.astype(sdt), udt) ^ top
    x = x.astype(fdt)
    nan = jnp.isnan(x)
    bits = lax.bitcast_convert_type(x, udt)
    # -0.0 ties with +0.0; done on the bits because float arithmetic on CPU
    # flushes denormals to zero and would merge them with 0.
    bits = jnp.where(bits == top, udt(0), bits)
    keys = jnp.where((bits >> (bits_n - 1)) == 1, ~bits, bits | top)
    # -inf maps to 0x007FFFFF...; NaN gets 0, strictly below it.
    return jnp.where(nan, udt(0), keys)


def _explicit_sharding(x: jax.Array):
    """The sharding of ``x`` if it lives on an explicit mesh (sharding in
    types), else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not any(
            t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    return sharding


def _scatter_count(digit: jax.Array, hist: jax.Array) -> jax.Array:
    """``hist`` plus the histogram of ``digit`` (any shape, never reshaped so
    that a sharded leaf is counted shard by shard and only histograms are
    all-reduced); indices past the end are dropped."""
    one = jnp.ones((), hist.dtype)
    sharding = _explicit_sharding(digit)
    if sharding is not None:  # sharding-in-types needs the (replicated) result sharding spelled out
        with jax.sharding.use_abstract_mesh(sharding.mesh):
            return hist.at[digit].add(one, out_sharding=jax.sharding.PartitionSpec())
    return hist.at[digit].add(one)


def _iota(like: jax.Array, dim: int, dtype=jnp.uint32) -> jax.Array:
    """``broadcasted_iota`` shaped and (explicitly) sharded like ``like``."""
    return lax.broadcasted_iota(dtype, like.shape, dim, out_sharding=_explicit_sharding(like))


_CHUNK = 1 << 19  # entries counted per scatter: keeps its index buffers in cache


def _shard_counts(x: jax.Array) -> Optional[tuple]:
    """Devices along each axis of an explicitly sharded array, else None."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return None
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    counts = []
    for entry in spec:
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        counts.append(int(np.prod([mesh.shape[n] for n in names])) if names else 1)
    return tuple(counts)


def _chunking(shape: tuple, shards: Optional[tuple] = None) -> tuple[int, int]:
    """(axis, k): count a leaf in ``k`` chunks along ``axis``.

    With several devices chunk ``j`` holds the slices ``j, j + k, j + 2k, ...``
    of ``axis`` (see ``_chunk_of``), so on a sharded axis each chunk has rows
    on every device: devices slice their own data and only the small
    histogram is reduced. The outermost axis that can be split finely enough
    is used, so each slice is a long contiguous run.
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


_SPARE = 1024  # bins that take the entries not counted: see _leaf_histogram


def _leaf_histogram(make_keys, leaf: int, bins: int, index_of, spread=True) -> jax.Array:
    """Histogram over ``bins`` of one leaf: ``index_of(keys)`` gives each
    key's bin (``>= bins``: not counted); large leaves are counted chunk by
    chunk.

    XLA:CPU scatters serially, one entry after the other. With ``spread`` (on
    a single device; may be traced), entries not counted land in ``_SPARE``
    throw-away bins chosen by column rather than being dropped: a drop is a
    branch, and a random mix of counted and uncounted entries (say 30% of a
    layer already pruned) would mispredict it constantly. When nearly all
    entries go uncounted (later radix passes) dropping them is cheaper. On
    several devices the histogram is all-reduced, so it stays 2**16 bins.
    """
    spares = 0 if _strided() else _SPARE

    def count(keys, hist):
        index = index_of(keys)
        dropped = jnp.uint32(bins + spares)  # past the end: dropped
        if keys.ndim and spares:
            uncounted = jnp.where(spread, bins + _iota(keys, keys.ndim - 1) % spares, dropped)
        else:
            uncounted = dropped
        index = jnp.where(index < bins, index, uncounted)
        return _scatter_count(index.astype(jnp.int32), hist)

    zeros = jnp.zeros(bins + spares, jnp.uint32)
    shape = make_keys.shapes[leaf]
    axis, k = _chunking(shape, _shard_counts(make_keys.arrays[leaf]))
    if k == 1:
        hist = count(make_keys(leaf), zeros)
    else:
        hist = lax.fori_loop(0, k, lambda j, h: count(make_keys(leaf, axis, k, j), h), zeros)
    return hist[:bins]


def _histogram(make_keys, leaf: int, shift, prefix, first) -> jax.Array:
    """Histogram of the 16-bit digit at ``shift`` (traced) of one leaf's
    keys, counting only keys whose higher bits equal ``prefix`` (all keys in
    the ``first`` pass). Key 0 (NaN or demoted, often most entries once
    masks nest) is not counted: one shared counter would serialise the
    scatter. ``_kth_key`` restores its count from the totals."""
    def index_of(keys):
        udt = keys.dtype
        digit = (keys >> shift.astype(udt)) & udt.type(_BINS - 1)
        high = shift.astype(udt) + udt.type(_DIGIT_BITS)
        # first pass: the shift would be the key width (undefined), compare nothing
        same = (keys >> jnp.where(first, 0, high).astype(udt)) == (
            prefix >> jnp.where(first, 0, high).astype(udt))
        count = (keys != 0) & (first | same)
        return jnp.where(count, digit, _BINS)  # _BINS: not counted

    # Pass 1 leaves out only key 0; later passes leave out all but one bucket.
    return _leaf_histogram(make_keys, leaf, _BINS, index_of, spread=first)


def _inclusive_sums(v: jax.Array) -> jax.Array:
    """Exact prefix sums of a short uint32 vector as one masked reduction
    (XLA:CPU lowers ``cumsum`` to a log-depth scan that is slow to compile)."""
    i = jnp.arange(v.shape[0])
    return jnp.sum(jnp.where(i[None, :] <= i[:, None], v[None, :], jnp.uint32(0)), axis=1,
                   dtype=jnp.uint32)


def _digit_at(hist: jax.Array, remaining) -> tuple[jax.Array, jax.Array]:
    """The bin holding the entry of 0-based rank ``remaining`` of a 2**16-bin
    histogram, and the count of all bins before it.

    Searched top-down through block sums of 16**3, 16**2, 16 and 1 bins: one
    read of the histogram builds the sums, then each level looks at only the
    16 children of the block found above it (a full prefix sum would cost
    tens of operations per bin, as much as counting a small leaf)."""
    fan = 16
    levels = [hist]
    while levels[-1].shape[0] > fan:
        levels.append(jnp.sum(levels[-1].reshape(-1, fan), axis=1, dtype=jnp.uint32))
    block = jnp.int32(0)
    before = jnp.uint32(0)
    for level in reversed(levels):
        children = lax.dynamic_slice_in_dim(level, block * fan, fan) if level.shape[0] > fan \
            else level
        cum = _inclusive_sums(children) + before
        c = jnp.minimum(jnp.sum(cum <= remaining, dtype=jnp.int32), fan - 1)
        before = jnp.where(c > 0, cum[jnp.maximum(c - 1, 0)], before)
        block = block * fan + c
    return block, before


def _kth_key(make_keys, rank):
    """Key of the entry of 0-based ``rank`` in ascending order, the number of
    entries strictly below it, and the number equal to it.

    ``make_keys(i, ...)`` rebuilds leaf ``i``'s keys (or one chunk of them);
    rebuilding them in each pass lets XLA fuse the key computation into the
    histogram instead of storing keys. The passes (one per 16 key bits) are
    one loop: the program holds the counting code once.
    """
    udt = make_keys.dtype
    bits_n = udt.itemsize * 8
    # Entries whose higher digits equal the prefix: all of them in pass 1.
    total = jnp.uint32(sum(int(np.prod(s)) for s in make_keys.shapes))

    def one_pass(p, carry):
        prefix, remaining, below, _, matching = carry
        shift = jnp.uint32(bits_n - _DIGIT_BITS) - p.astype(jnp.uint32) * jnp.uint32(_DIGIT_BITS)
        first = p == 0
        hist = sum(_histogram(make_keys, i, shift, prefix, first)
                   for i in range(len(make_keys.shapes)))
        # Uncounted key-0 entries belong to digit 0 (non-zero only while prefix == 0).
        hist = hist.at[0].add(matching - jnp.sum(hist, dtype=jnp.uint32))
        digit, before = _digit_at(hist, remaining)
        equal = hist[digit]
        return (prefix | (digit.astype(udt) << shift.astype(udt)), remaining - before,
                below + before, equal, equal)

    start = (jnp.zeros((), udt), jnp.asarray(rank, jnp.uint32), jnp.zeros((), jnp.uint32),
             jnp.zeros((), jnp.uint32), total)
    prefix, _, below, equal, _ = lax.fori_loop(0, bits_n // _DIGIT_BITS, one_pass, start)
    return prefix, below, equal


def _flat_index(like: jax.Array, first_dim: int = 0) -> jax.Array:
    """Row-major flat index of every entry of ``like`` (over its axes from
    ``first_dim`` on: the index within each leaf of a stack), built from
    iotas so that nothing parameter-sized is read and a sharded leaf stays
    sharded."""
    index = jnp.zeros_like(like, dtype=jnp.uint32)
    stride = 1
    for dim in reversed(range(first_dim, like.ndim)):
        index = index + _iota(like, dim) * jnp.uint32(stride)
        stride *= like.shape[dim]
    return index


def lowest(scores: Sequence[jax.Array], n_prune,
           protected: Optional[Sequence[Optional[jax.Array]]] = None,
           demoted: Optional[Sequence[Optional[jax.Array]]] = None, *,
           kept: Optional[Sequence[Optional[jax.Array]]] = None,
           elementwise: Optional[Callable[[jax.Array], jax.Array]] = None) -> list[jax.Array]:
    """Boolean "pruned" arrays marking exactly the ``n_prune`` lowest scores.

    Args:
      scores: arrays of any shapes, all floating or all integer (float64 and
        int64 scores use 64-bit keys). NaN ranks lowest. Integers are ranked
        exactly; a 32-bit integer equal to its dtype's minimum (maximum) ties
        with ``demoted`` (``protected``) entries, broken by position.
      n_prune: how many entries to mark (Python int or traced int), clipped to
        ``[0, total - protected]``.
      protected: optional bool arrays (or None) aligned with ``scores``; True
        entries rank above everything and are pruned only if nothing else is
        left.
      demoted: optional bool arrays (or None); True entries rank lowest, like
        NaN (e.g. already-pruned weights, so that masks nest), without the
        cost of writing NaN into a copy of the scores.
      kept: optional bool arrays (or None); False entries rank lowest. The
        complement of ``demoted``: pass the current keep-masks here and their
        negation is never written out.
      elementwise: optional function applied to every score array before
        ranking, inside each counting pass, so that its result is never
        stored (``jnp.abs`` ranks magnitudes straight from the weights).

    Ties are broken by position in ``scores``, then by flat index: the earlier
    entry is pruned first.

    Returns:
      One bool array per input, True where pruned.

    >>> import jax.numpy as jnp
    >>> [m.tolist() for m in lowest([jnp.array([3.0, 1.0]), jnp.array([1.0, 0.5])], 2)]
    [[False, True], [False, True]]
    >>> lowest([jnp.array([-3.0, 1.0, -2.0])], 1, elementwise=jnp.abs)[0].tolist()
    [False, True, False]
    """
    return _select(scores, n_prune, protected, demoted, kept, elementwise, keep=False)


def _select(scores, n_prune, protected, demoted, kept, elementwise, keep: bool):
    """``lowest``, or with ``keep`` its complement (keep-masks), built inside
    the same fusions so that no second mask array is written."""
    scores = _as_score_arrays(scores)
    total = sum(s.size for s in scores)
    if total >= 2**32:
        raise ValueError(f"cannot select among {total} entries (limit 2**32 - 1)")
    if isinstance(n_prune, (int, np.integer)):
        if n_prune <= 0:  # *_like: the result keeps each score's sharding
            return [jnp.full_like(s, keep, dtype=bool) for s in scores]
        if n_prune >= total and protected is None:
            return [jnp.full_like(s, not keep, dtype=bool) for s in scores]

    def aligned(masks, name):
        masks = list(masks) if masks is not None else [None] * len(scores)
        if len(masks) != len(scores):
            raise ValueError(f"{name} has {len(masks)} entries for {len(scores)} score arrays")
        for i, (m, s) in enumerate(zip(masks, scores)):
            if m is not None and tuple(jnp.shape(m)) != tuple(s.shape):
                raise ValueError(f"{name}[{i}] has shape {tuple(jnp.shape(m))}, "
                                 f"score array {i} has shape {tuple(s.shape)}")
        return masks

    protected, demoted, kept = (aligned(m, n) for m, n in
                                ((protected, "protected"), (demoted, "demoted"), (kept, "kept")))
    ranked = scores if elementwise is None else [
        jax.eval_shape(elementwise, s) for s in scores]
    wide = any(jnp.dtype(s.dtype).itemsize > 4 for s in ranked)
    signed = _check_one_kind([s.dtype for s in ranked])
    n_prune = jnp.clip(jnp.asarray(n_prune), 0, total).astype(jnp.uint32)
    return _lowest(scores, protected, demoted, kept, n_prune, wide, elementwise, keep, signed)


def _select_each(scores, n_prunes, kept=None, elementwise=None, keep: bool = False,
                 protected=None, rows: Optional[Sequence[bool]] = None) -> list[jax.Array]:
    """One independent selection per array (``lowest([x], n)`` for each),
    or per row of an array marked in ``rows`` (a stack of layers:
    ``n_prunes[i]`` is then a vector over its rows). Arrays of equal shape
    share one compiled selection (``_lowest_each``)."""
    scores = _as_score_arrays(scores)
    n = len(scores)
    rows = tuple(bool(r) for r in rows) if rows is not None else (False,) * n
    kept = list(kept) if kept is not None else [None] * n
    protected = list(protected) if protected is not None else [None] * n
    out: list = [None] * n
    todo: dict = {}
    for i, x in enumerate(scores):
        size = int(np.prod(x.shape[1:] if rows[i] else x.shape))
        if size >= 2**32:
            raise ValueError(f"cannot select among {size} entries (limit 2**32 - 1)")
        for name, m in (("kept", kept[i]), ("protected", protected[i])):
            if m is not None and tuple(jnp.shape(m)) != tuple(x.shape):
                raise ValueError(f"{name}[{i}] has shape {tuple(jnp.shape(m))}, "
                                 f"score array {i} has shape {tuple(x.shape)}")
        count = n_prunes[i]
        if isinstance(count, (int, np.integer)) and not rows[i]:
            if count <= 0 or (count >= size and protected[i] is None):
                out[i] = jnp.full_like(x, keep if count <= 0 else not keep, dtype=bool)
                continue
        ranked = x if elementwise is None else jax.eval_shape(elementwise, x)
        kind = (jnp.dtype(ranked.dtype).itemsize > 4, _check_one_kind([ranked.dtype]))
        todo.setdefault(kind, []).append(i)
    for (wide, signed), idx in todo.items():
        counts = [jnp.clip(jnp.asarray(n_prunes[i]), 0,
                           int(np.prod(scores[i].shape[1:] if rows[i] else scores[i].shape))
                           ).astype(jnp.uint32) for i in idx]
        masks = _lowest_each([scores[i] for i in idx], [protected[i] for i in idx],
                             [None] * len(idx), [kept[i] for i in idx], counts, wide,
                             elementwise, keep, signed, tuple(rows[i] for i in idx))
        for i, m in zip(idx, masks):
            out[i] = m
    return out


def _select_parts(parts, groups, n_prune, protected, kept, elementwise, keep: bool):
    """``_select`` on stacks of equal leaves (``jaxprune.leaf_groups``) that
    the caller keeps stacked across calls (the layer-collapse guard's loop);
    returns the stacked masks."""
    ranked = parts if elementwise is None else [jax.eval_shape(elementwise, p) for p in parts]
    wide = any(jnp.dtype(r.dtype).itemsize > 4 for r in ranked)
    signed = _check_one_kind([r.dtype for r in ranked])
    total = sum(int(np.prod(p.shape)) for p in parts)
    n_prune = jnp.clip(jnp.asarray(n_prune), 0, total).astype(jnp.uint32)
    return _lowest_parts(parts, protected, [None] * len(parts), kept, n_prune, groups, wide,
                         elementwise, keep, signed)


def _as_score_arrays(scores, names: Optional[Sequence[str]] = None) -> list[jax.Array]:
    """``jnp.asarray`` of each score, warning when float64 scores are cut to
    float32 because x64 is off (near-equal values would then tie)."""
    out = []
    for i, s in enumerate(scores):
        if np.dtype(getattr(s, "dtype", np.float32)) == np.float64 and not jax.config.jax_enable_x64:
            name = f"'{names[i]}'" if names is not None else f"score array {i}"
            from jaxprune.diagnostics import warn
            warn(f"{name} holds float64 scores but jax_enable_x64 is off: they are ranked as "
                 "float32, so values closer than float32 resolution tie. Enable x64 "
                 "(jax.config.update('jax_enable_x64', True)) to rank them exactly.")
        out.append(jnp.asarray(s))
    return out


def _check_one_kind(dtypes) -> Optional[bool]:
    """Integer and floating scores have different order keys: one ranking
    takes one kind (and integers of one signedness, or narrow enough to
    convert), so that every comparison is exact. Returns whether integers
    are ranked as signed (None for floats)."""
    ints = [np.dtype(d) for d in dtypes if jnp.issubdtype(d, jnp.integer)]
    if not ints:
        return None
    if len(ints) < len(dtypes):
        raise TypeError("scores mix integer and floating dtypes in one ranking "
                        f"({sorted({str(np.dtype(d)) for d in dtypes})}); cast them to one kind")
    signed = [d for d in ints if d.kind == "i"]
    wide_unsigned = [d for d in ints if d.kind == "u" and d.itemsize >= 4]
    if signed and wide_unsigned:
        raise TypeError(f"scores mix signed and {wide_unsigned[0]} integers in one ranking; "
                        "cast them to one integer dtype")
    return bool(signed)


# How large leaves are cut into chunks: None picks "contiguous" on a single
# device (XLA:CPU counts a contiguous block about 1.5x faster) and "strided"
# when several devices exist (a leaf may be sharded; see _Keys).
_LAYOUT: Optional[str] = None


def _strided() -> bool:
    if _LAYOUT is not None:
        return _LAYOUT == "strided"
    return jax.device_count() > 1


def _chunk_of(x: jax.Array, chunk) -> jax.Array:
    """Chunk ``(axis, k, j, strided)`` of ``x`` (see ``_chunking``): rows
    ``j::k`` of ``axis`` if strided, else the ``j``-th of ``k`` blocks."""
    if chunk is None:
        return x
    axis, k, j, strided = chunk
    n = x.shape[axis]
    if strided:
        split = x.reshape(*x.shape[:axis], n // k, k, *x.shape[axis + 1:])
        return lax.dynamic_index_in_dim(split, j, axis + 1, keepdims=False)
    split = x.reshape(*x.shape[:axis], k, n // k, *x.shape[axis + 1:])
    return lax.dynamic_index_in_dim(split, j, axis, keepdims=False)


class _Keys:
    """Rebuilds the order keys of leaf ``i`` (whole or one chunk)."""

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
        # contiguous block would live on one shard and force an all-gather).
        # With one device the contiguous block is used: it counts faster.
        chunk = (axis, k, j, _strided())
        return self.transform(i, _chunk_of(a, chunk), chunk=chunk)


def _row_cols(shape: tuple) -> int:
    """Columns of ``_rows``: the last axis, split below 2**16 where it can be."""
    cols = shape[-1] if shape else 1
    if cols >= 1 << 16:  # split the last axis (the outer part joins the rows)
        cols = max((d for d in range(1, 1 << 16) if cols % d == 0), default=cols)
    return cols


def _rows(x: jax.Array) -> jax.Array:
    """``x`` as a matrix whose rows are runs of consecutive flat indices, each
    shorter than 2**16 where the shape allows (so that 16-bit row counts,
    which XLA:CPU vectorises, cannot overflow)."""
    return x.reshape(-1, _row_cols(x.shape))


def _first_reaching(counts: jax.Array, target) -> tuple[jax.Array, jax.Array]:
    """Smallest ``i`` with ``sum(counts[:i + 1]) >= target`` and
    ``sum(counts[:i])``, by bisection over masked sums: no cumsum and no
    dynamic indexing, so a sharded ``counts`` only ever all-reduces scalars."""
    n = counts.shape[0]
    index = _iota(counts, 0, jnp.int32)

    def prefix(i):  # sum(counts[:i])
        return jnp.sum(jnp.where(index < i, counts, 0), dtype=jnp.uint32)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        reached = prefix(mid + 1) >= target
        return jnp.where(reached, lo, mid + 1), jnp.where(reached, mid, hi)

    lo, _ = lax.fori_loop(0, max(n - 1, 1).bit_length(), step,
                          (jnp.int32(0), jnp.int32(n - 1)))
    return lo, prefix(lo)


def _ties_per_row(rows: jax.Array, t) -> jax.Array:
    """uint32 count of entries equal to ``t`` in each row of a matrix.

    XLA:CPU vectorises narrow sums but not a 32-bit sum over long rows (5x
    slower): on one device each run of 32 (or 16, 8) columns is summed in 8
    bits first, which also keeps the temporaries at 1/32 byte per entry.
    With several devices a column split could cut across shards, so rows are
    summed in 16 bits (2 bytes per entry of temporaries).
    """
    cols = rows.shape[1]
    group = next((g for g in (32, 16, 8) if cols % g == 0), None)
    equal = rows == t
    if group is not None and not _strided():
        part = jnp.sum(equal.reshape(rows.shape[0], cols // group, group), axis=-1,
                       dtype=jnp.uint8)
        return jnp.sum(part, axis=1, dtype=jnp.uint32)
    narrow = cols < 1 << 16
    return jnp.sum(equal, axis=1, dtype=jnp.uint16 if narrow else jnp.uint32).astype(jnp.uint32)


def _tie_cuts(make_keys, t, needed, groups) -> list[jax.Array]:
    """Per part (a stack of equal leaves, see ``jaxprune.leaf_groups``), per
    row (leaf): the flat index below which its ties (keys equal to ``t``)
    are pruned, so that exactly ``needed`` ties are pruned in (leaf, flat
    index) order. Ties are counted per row of each leaf
    (``_ties_per_row``); in the one leaf where the cut falls, the row
    holding it is read back (one pass of ``any``) and its column found by
    bisection. Keys are rebuilt by ``make_keys(p)`` wherever used, never
    stored; the program holds one copy of this per part, not per leaf."""
    n_leaves = sum(len(g) for g in groups)
    per_row, ties = [], []
    for p, shape in enumerate(make_keys.shapes):
        b, inner = shape[0], shape[1:]
        if int(np.prod(inner)) == 0:
            per_row.append(None)
            ties.append(jnp.zeros(b, jnp.uint32))
            continue
        rows = _rows3(make_keys(p), inner)
        counts = _ties_per_row(rows.reshape(-1, rows.shape[-1]), t).reshape(rows.shape[:2])
        per_row.append(counts)
        ties.append(jnp.sum(counts, axis=1, dtype=jnp.uint32))
    # Leaf order: part p row j is leaf groups[p][j] (a static permutation).
    order = np.concatenate([np.asarray(g, np.int32) for g in groups])
    in_leaf_order = np.argsort(order, kind="stable")
    ties_leaf = jnp.concatenate(ties)[in_leaf_order]
    before = jnp.cumsum(ties_leaf, dtype=jnp.uint32) - ties_leaf
    here_leaf = jnp.minimum(needed - jnp.minimum(before, needed), ties_leaf)
    cuts, offset = [], 0
    for p, shape in enumerate(make_keys.shapes):
        b, inner = shape[0], shape[1:]
        size = int(np.prod(inner))
        here = here_leaf[np.asarray(groups[p])] if n_leaves > 1 else here_leaf
        partial = (here > 0) & (here < ties[p])
        if size == 0:
            cuts.append(jnp.zeros(b, jnp.uint32))
            continue

        def split(p=p, inner=inner, here=here, partial=partial):
            row = jnp.argmax(partial).astype(jnp.int32)
            target = here[row]
            counts = lax.dynamic_index_in_dim(per_row[p], row, 0, keepdims=False)
            r, above = _first_reaching(counts, target)
            rows = _rows3(make_keys(p), inner)
            # Row r of leaf ``row`` by a masked "any": sharding-safe and cheap.
            in_row = ((rows == t) & (_iota(rows, 0, jnp.int32) == row)
                      & (_iota(rows, 1, jnp.int32) == r))
            pattern = jnp.any(in_row, axis=(0, 1)).astype(jnp.uint32)
            col, _ = _first_reaching(pattern, target - above)
            return r.astype(jnp.uint32) * jnp.uint32(rows.shape[-1]) + col.astype(jnp.uint32) + 1

        cut = lax.cond(jnp.any(partial), split, lambda: jnp.uint32(0))
        cuts.append(jnp.where(partial, cut, jnp.where(here == 0, jnp.uint32(0),
                                                      jnp.uint32(size))))
    return cuts


def _rows3(x: jax.Array, inner: tuple) -> jax.Array:
    """A stack ``(b, *inner)`` as ``(b, rows, cols)`` with ``_rows``'s rows."""
    return x.reshape(x.shape[0], -1, _row_cols(inner))


@functools.partial(jax.jit, static_argnames=("wide", "elementwise", "keep", "signed"))
def _lowest(scores, protected, demoted, kept, n_prune, wide, elementwise=None, keep=False,
            signed=None):
    """The selection of ``_select``, with leaves of equal shape stacked into
    one part each (``jaxprune.leaf_groups``): the program holds one copy of
    the counting passes per part, so it does not grow with the leaves."""
    # jitted so that eager callers compile once per set of shapes, not per op.
    groups = leaf_groups.group_indices(scores, protected, demoted, kept)
    stacked = [[leaf_groups.stack(a, g) for g in groups]
               for a in (scores, protected, demoted, kept)]
    parts = _lowest_parts(*stacked, n_prune, groups, wide, elementwise, keep, signed)
    return leaf_groups.unstack(parts, groups, len(scores), like=scores)


def _keys_fn(protected, demoted, kept, wide, elementwise, signed):
    top = np.iinfo(np.uint64 if wide else np.uint32).max

    def keys_of(i, a, chunk=None):
        k = order_keys(a if elementwise is None else elementwise(a), wide, signed)
        if demoted[i] is not None:
            k = jnp.where(_chunk_of(demoted[i], chunk), k.dtype.type(0), k)
        if kept[i] is not None:
            k = jnp.where(_chunk_of(kept[i], chunk), k, k.dtype.type(0))
        if protected[i] is not None:
            k = jnp.where(_chunk_of(protected[i], chunk), k.dtype.type(top), k)
        return k
    return keys_of


def _lowest_parts(parts, protected, demoted, kept, n_prune, groups, wide, elementwise, keep,
                  signed):
    """``_lowest`` on stacked parts ``(b, *shape)``, row ``j`` of part ``p``
    being leaf ``groups[p][j]``; returns the stacked masks."""
    keys_of = _keys_fn(protected, demoted, kept, wide, elementwise, signed)
    make_keys = _Keys(parts, keys_of)
    rank = jnp.maximum(n_prune, 1) - 1
    t, below, ties_total = _kth_key(make_keys, rank)
    ties_needed = n_prune - below  # >= 1 when n_prune >= 1

    def all_ties():  # the common case: no extra pass
        return [((keys_of(i, s) <= t) & (n_prune > 0)) ^ keep for i, s in enumerate(parts)]

    def some_ties():
        out = []
        for p, cut in enumerate(_tie_cuts(make_keys, t, ties_needed, groups)):
            k = make_keys(p)
            inner = _flat_index(k, first_dim=1)
            cut = cut.reshape((-1,) + (1,) * (k.ndim - 1))
            out.append(((k < t) | ((k == t) & (inner < cut))) ^ keep)
        return out

    return lax.cond((ties_needed == ties_total) | (n_prune == 0), all_ties, some_ties)


@functools.partial(jax.jit, static_argnames=("wide", "elementwise", "keep", "signed", "rows"))
def _lowest_each(scores, protected, demoted, kept, n_prunes, wide, elementwise=None,
                 keep=False, signed=None, rows=None):
    """One selection per leaf (per row of a leaf marked in ``rows``):
    ``n_prunes[i]`` holds leaf ``i``'s count (a vector over its rows when
    stacked). Leaves of equal shape are stacked and selected by one
    ``lax.map`` over their rows, so the program holds one selection per
    group of equal leaves."""
    groups = leaf_groups.group_indices(scores, protected, demoted, kept, rows=rows)
    out = []
    for g in groups:
        part, prot, dem, kep = (leaf_groups.stack(a, g, rows) for a in
                                (scores, protected, demoted, kept))
        counts = jnp.concatenate([jnp.asarray(n_prunes[i], jnp.uint32).reshape(-1) for i in g])
        out.append(_select_rows(part, prot, dem, kep, counts, wide, elementwise, keep, signed))
    return leaf_groups.unstack(out, groups, len(scores), rows, like=scores)


def _select_rows(part, prot, dem, kep, counts, wide, elementwise, keep, signed) -> jax.Array:
    """An independent selection in every row of a stack ``(b, *shape)``
    (``counts[j]`` entries of row ``j``), by one ``lax.map``."""
    def one(args):
        x, pr, de, ke, n = args
        lift = lambda a: None if a is None else a[None]
        return _lowest_parts([x[None]], [lift(pr)], [lift(de)], [lift(ke)], n, [[0]],
                             wide, elementwise, keep, signed)[0][0]

    if part.shape[0] == 1:
        return one((part[0], *(None if a is None else a[0] for a in (prot, dem, kep)),
                    counts[0]))[None]
    return lax.map(one, (part, prot, dem, kep, counts))


def select_stacked_rows(parts: Sequence[jax.Array], kept: Sequence[Optional[jax.Array]],
                        counts: Sequence[jax.Array], elementwise=None,
                        keep: bool = True) -> list[jax.Array]:
    """``_select_each`` on stacks the caller already holds (``jaxprune.leaf_groups``):
    for every stack ``parts[p]`` of shape ``(b, *shape)``, row ``j`` loses
    exactly its ``counts[p][j]`` lowest scores (entries with ``kept`` False
    first). Returns the stacked keep-masks (or pruned-masks with
    ``keep=False``). The optax transformations stack params and masks once
    per step and share the stacks between their checks and this selection."""
    if not len(parts) == len(kept) == len(counts):
        raise ValueError(f"select_stacked_rows: {len(parts)} stacks, {len(kept)} kept masks and "
                         f"{len(counts)} count vectors; one of each per stack is needed")
    out = []
    for part, kep, n in zip(parts, kept, counts):
        ranked = part if elementwise is None else jax.eval_shape(elementwise, part)
        wide = jnp.dtype(ranked.dtype).itemsize > 4
        signed = _check_one_kind([ranked.dtype])
        size = int(np.prod(part.shape[1:]))
        if size >= 2**32:
            raise ValueError(f"cannot select among {size} entries (limit 2**32 - 1)")
        n = jnp.clip(jnp.asarray(n), 0, size).astype(jnp.uint32)
        out.append(_select_rows(part, None, None, kep, n, wide, elementwise, keep, signed))
    return out
