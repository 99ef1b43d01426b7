"""Human-readable and machine-readable summaries of a (pruned) model."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from jaxprune.tree import check_same_structure, leaves_with_paths

PyTree = Any

__all__ = ["LeafSummary", "Summary", "summary"]


@dataclasses.dataclass(frozen=True)
class LeafSummary:
    """One row of ``summary``: a leaf, its size and how much of it is kept."""

    path: str
    shape: tuple
    dtype: str
    size: int
    nonzeros: int
    dense_bytes: int
    sparse_bytes: int  # kept values + a 1-bit-per-entry mask

    @property
    def density(self) -> float:
        return self.nonzeros / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """A per-leaf table with totals; ``str()`` prints it, ``.rows`` and
    ``to_dict()`` give it as data."""

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

    def to_dict(self) -> dict:
        return {
            "rows": [dict(dataclasses.asdict(r), density=r.density) for r in self.rows],
            "total": {"size": self.size, "nonzeros": self.nonzeros, "density": self.density,
                      "dense_bytes": self.dense_bytes, "sparse_bytes": self.sparse_bytes},
        }

    def __str__(self) -> str:
        header = ("path", "shape", "dtype", "density", "nonzeros", "dense B", "sparse B")
        lines = [(r.path, str(r.shape), r.dtype, f"{r.density:.3f}", str(r.nonzeros),
                  str(r.dense_bytes), str(r.sparse_bytes)) for r in self.rows]
        lines.append(("total", "", "", f"{self.density:.3f}", str(self.nonzeros),
                      str(self.dense_bytes), str(self.sparse_bytes)))
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        body = [fmt.format(*line) for line in lines]
        return "\n".join([fmt.format(*header), rule, *body[:-1], rule, body[-1]])


def summary(params: PyTree, masks: Optional[PyTree] = None) -> Summary:
    """Per-leaf sizes and densities of ``params`` (under ``masks`` if given).

    Nonzeros count the entries a mask keeps (or, without masks, the nonzero
    entries). ``sparse_bytes`` is what storing kept values plus a 1-bit mask
    costs. Runs on the host (it reads values), not under ``jit``.

    >>> import jax.numpy as jnp
    >>> s = summary({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]])})
    >>> (s.nonzeros, s.size, s.dense_bytes, s.sparse_bytes)
    (2, 4, 16, 9)
    """
    items = leaves_with_paths(params)
    if masks is not None:
        check_same_structure(params, masks, "params", "masks", b_none_ok=True)
        mask_leaves = [m for _, m in leaves_with_paths(masks, keep_none=True)]
    else:
        mask_leaves = [None] * len(items)
    rows = []
    for (path, x), m in zip(items, mask_leaves):
        arr = np.asarray(x)
        nnz = int(np.count_nonzero(np.asarray(m))) if m is not None else int(np.count_nonzero(arr))
        itemsize = arr.dtype.itemsize
        dense = arr.size * itemsize
        # An unmasked leaf next to masked ones is stored dense.
        unmasked = masks is not None and m is None
        sparse = dense if unmasked else nnz * itemsize + (arr.size + 7) // 8
        rows.append(LeafSummary(path, tuple(arr.shape), str(arr.dtype), int(arr.size), nnz,
                                int(dense), int(sparse)))
    return Summary(rows)


# Compute and speed live in jaxprune.cost; the report names are the public ones.
from jaxprune.cost import Latency, WeightedOp, flops, latency, sparse_flops, weighted_ops  # noqa: E402

__all__ += ["flops", "sparse_flops", "weighted_ops", "WeightedOp", "latency", "Latency"]
