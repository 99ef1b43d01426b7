"""Human-readable and machine-readable summaries of a (pruned) model."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from jaxprune.tree import Where, check_same_structure, leaves_with_paths, select

PyTree = Any

__all__ = ["LeafSummary", "Summary", "summary"]


@dataclasses.dataclass(frozen=True)
class LeafSummary:
    """One row of ``summary``: a leaf, its size and how much of it is kept.

    ``pruned`` says whether the leaf is subject to pruning (it has a mask, or
    without masks it is selected by ``where``). An unpruned leaf keeps every
    entry (density 1.0) whatever its values: a zero-initialised bias is not
    sparse, it is stored dense.
    """

    path: str
    shape: tuple
    dtype: str
    size: int
    nonzeros: int  # entries kept: mask True, or nonzero values; all entries if not pruned
    dense_bytes: int
    sparse_bytes: int  # kept values + a 1-bit-per-entry mask (dense if not pruned)
    pruned: bool = True

    @property
    def density(self) -> float:
        return self.nonzeros / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """A per-leaf table with totals; ``str()`` prints it, ``.rows`` and
    ``to_dict()`` give it as data. ``size``, ``nonzeros``, ``density`` and
    the byte counts are over the whole model; ``pruned_only`` restricts the
    table (and so its totals) to the pruned leaves."""

    rows: list

    @property
    def size(self) -> int:
        return sum(r.size for r in self.rows)

    @property
    def nonzeros(self) -> int:
        return sum(r.nonzeros for r in self.rows)

    @property
    def density(self) -> float:
        return self.nonzeros / self.size if self.size else 1.0

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)

    @property
    def sparse_bytes(self) -> int:
        return sum(r.sparse_bytes for r in self.rows)

    def pruned_only(self) -> "Summary":
        """The rows of the pruned leaves (their totals: the pruned set)."""
        return Summary([r for r in self.rows if r.pruned])

    def _totals(self) -> dict:
        return {"size": self.size, "nonzeros": self.nonzeros, "density": self.density,
                "dense_bytes": self.dense_bytes, "sparse_bytes": self.sparse_bytes}

    def to_dict(self) -> dict:
        return {
            "rows": [dict(dataclasses.asdict(r), density=r.density) for r in self.rows],
            "pruned": self.pruned_only()._totals(),
            "total": self._totals(),
        }

    def __str__(self) -> str:
        header = ("path", "shape", "dtype", "pruned", "density", "kept", "dense B",
                  "sparse B")

        def line(name, s, pruned=""):
            return (name, "", "", pruned, f"{s.density:.3f}", str(s.nonzeros),
                    str(s.dense_bytes), str(s.sparse_bytes))

        lines = [(r.path, str(r.shape), r.dtype, "yes" if r.pruned else "no", f"{r.density:.3f}",
                  str(r.nonzeros), str(r.dense_bytes), str(r.sparse_bytes)) for r in self.rows]
        totals = [line("total (pruned leaves)", self.pruned_only()), line("total (model)", self)]
        widths = [max(len(h), *(len(x[i]) for x in lines + totals)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([fmt.format(*header), rule, *(fmt.format(*x) for x in lines), rule,
                          *(fmt.format(*x) for x in totals)])


def summary(params: PyTree, masks: Optional[PyTree] = None, *, where: Where = None) -> Summary:
    """Per-leaf sizes and densities of ``params`` (under ``masks`` if given),
    with totals over the pruned leaves and over the whole model.

    A leaf is pruned if it has a mask (``masks`` given) or, without masks,
    if ``where`` selects it (default: floating leaves with ``ndim >= 2`` not
    named ``bias`` or ``scale``, as in every ``jaxprune.masks`` function).
    Nonzeros of a pruned leaf count the entries its mask keeps (without
    masks: its nonzero values); an unpruned leaf counts as dense. ``sparse_bytes`` is what storing kept
    values plus a 1-bit mask costs (dense bytes for unpruned leaves). Runs
    on the host (it reads values), not under ``jit``.

    >>> import jax.numpy as jnp
    >>> s = summary({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]]), "b": jnp.zeros(2)})
    >>> (s.nonzeros, s.size, s.pruned_only().nonzeros, s.pruned_only().size)
    (4, 6, 2, 4)
    >>> [(r.path, r.pruned, r.density) for r in s.rows]
    [('b', False, 1.0), ('w', True, 0.5)]
    """
    items = leaves_with_paths(params)
    if masks is not None:
        check_same_structure(params, masks, "params", "masks", b_none_ok=True)
        mask_leaves = [m for _, m in leaves_with_paths(masks, keep_none=True)]
        pruned = [m is not None for m in mask_leaves]
    else:
        mask_leaves = [None] * len(items)
        pruned = select(params, where, require_any=False)
    rows = []
    for (path, x), m, is_pruned in zip(items, mask_leaves, pruned):
        arr = np.asarray(x)
        dense = arr.size * arr.dtype.itemsize
        if not is_pruned:
            nnz, sparse = int(arr.size), dense
        else:
            nnz = int(np.count_nonzero(np.asarray(m) if m is not None else arr))
            sparse = nnz * arr.dtype.itemsize + (arr.size + 7) // 8
        rows.append(LeafSummary(path, tuple(arr.shape), str(arr.dtype), int(arr.size), nnz,
                                int(dense), int(sparse), bool(is_pruned)))
    return Summary(rows)


# Compute and speed live in jaxprune.cost; the report names are the public ones.
from jaxprune.cost import Latency, WeightedOp, flops, latency, sparse_flops, weighted_ops  # noqa: E402

__all__ += ["flops", "sparse_flops", "weighted_ops", "WeightedOp", "latency", "Latency"]
