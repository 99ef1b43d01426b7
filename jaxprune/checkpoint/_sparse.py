"""Sparse export for deployment: kept values + bit-packed masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.checkpoint import _integrity
from jaxprune.checkpoint._integrity import CHECKSUM
from jaxprune.checkpoint._state import _FORMAT, PathLike, PyTree
from jaxprune.checkpoint._structured import abstract_from_spec, tree_spec
from jaxprune.tree import check_same_structure, leaves_with_paths

_WHAT = "export_sparse"


class SparseExport(NamedTuple):
    """What ``export_sparse`` wrote.

    Attributes:
      directory: where it went.
      sparse_bytes: its size on disk.
      dense_bytes: the size of the dense checkpoint it was compared with
        (``dense_checkpoint``), else the raw bytes of the dense arrays.
      ratio: ``sparse_bytes / dense_bytes``.
      raw_ratio: ``sparse_bytes`` over the raw bytes of the dense arrays
        (orbax compresses, so a dense checkpoint of a pruned model is
        already smaller than its raw bytes).
    """

    directory: str
    sparse_bytes: int
    dense_bytes: int
    ratio: float
    raw_ratio: float


def directory_size(directory: PathLike) -> int:
    """Total size in bytes of the files under ``directory`` (e.g. a dense
    checkpoint step, to compare with ``SparseExport.sparse_bytes``)."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def _parts(i: int, masked: bool) -> list[tuple[str, str]]:
    """(array name, what it holds) of leaf ``i`` in the export."""
    if not masked:
        return [(f"leaf{i}", "dense")]
    return [(f"leaf{i}_values", "kept values"), (f"leaf{i}_bits", "mask bits")]


def export_sparse(directory: PathLike, params: PyTree, masks: PyTree, *,
                  dense_checkpoint: Optional[PathLike] = None) -> SparseExport:
    """Writes only what a sparse model needs: per masked leaf the kept values
    (in row-major order) and the mask packed at 1 bit per weight; unmasked
    leaves (``None`` mask) are stored dense. Fully pruned and zero-size
    leaves round-trip exactly. Every stored array gets a checksum that
    ``load_sparse`` verifies.

    The directory is written under a temporary name and renamed when
    complete: an interrupted export leaves no ``directory``, and a retry
    into it removes what the interrupted one left.

    Args:
      directory: a new directory (must not exist or be empty).
      params: nested dicts / lists of arrays.
      masks: bool masks like ``params`` (``None`` on unmasked leaves).
      dense_checkpoint: a dense checkpoint directory (e.g. a step directory
        written by ``save``) to report the size ratio against.

    Returns:
      A ``SparseExport`` with the file sizes.
    """
    check_same_structure(params, masks, "params", "masks", b_none_ok=True)
    p_items = leaves_with_paths(params)
    m_items = leaves_with_paths(masks, keep_none=True)
    arrays, layout, dense = {}, [], 0
    for i, ((path, p), (_, m)) in enumerate(zip(p_items, m_items)):
        p = np.asarray(p)
        dense += p.nbytes
        if m is None:
            arrays[f"leaf{i}"] = p
            layout.append([path, list(p.shape), str(p.dtype), False, int(p.size)])
            continue
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise TypeError(f"masks must be bool; '{path}' is {m.dtype}")
        arrays[f"leaf{i}_values"] = p[m]
        arrays[f"leaf{i}_bits"] = np.packbits(m.reshape(-1))
        layout.append([path, list(p.shape), str(p.dtype), True, int(m.sum())])
    spec = tree_spec(jax.tree.map(lambda x: np.zeros((), np.int8), params), what=_WHAT)
    names = list(arrays)
    sums = dict(zip(names, _integrity.checksums([arrays[n] for n in names])))
    stored = {n: a for n, a in arrays.items() if a.size}  # orbax refuses zero-size arrays
    info = {"format": _FORMAT, "leaves": layout, "tree": spec, "checksum": CHECKSUM,
            "checksums": sums}
    with _integrity.atomic_directory(Path(directory), _WHAT) as tmp:
        if stored:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / "arrays", stored)
                ckptr.wait_until_finished()
        (tmp / "sparse.json").write_text(json.dumps(info))
    directory = Path(directory).absolute()
    size = directory_size(directory)
    reference = dense if dense_checkpoint is None else directory_size(dense_checkpoint)
    return SparseExport(str(directory), size, reference, size / max(reference, 1),
                        size / max(dense, 1))


def load_sparse(directory: PathLike, *, verify: bool = True) -> tuple[PyTree, PyTree]:
    """Reads an ``export_sparse`` directory back as dense ``(params, masks)``
    (numpy arrays; pruned entries are 0), checking every stored array against
    its checksum unless ``verify=False``.

    Raises:
      FileNotFoundError: nothing was exported to ``directory``.
      CorruptCheckpointError: an array does not match its checksum (the
        leaf path is named), or a file is damaged or missing.
    """
    directory = Path(directory).absolute()
    what = f"sparse export {directory}"
    _integrity.check_complete(directory, _WHAT, ["sparse.json"])
    info = _integrity.load_json(what, directory / "sparse.json")
    try:
        leaves = [(str(path), [int(d) for d in shape], jnp.dtype(dtype), bool(masked),
                   int(rest[0]) if rest else None)
                  for path, shape, dtype, masked, *rest in info["leaves"]]
        treedef = jax.tree.structure(abstract_from_spec(info["tree"]))
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
        raise _integrity.CorruptCheckpointError(
            f"{what} is damaged: {directory / 'sparse.json'} has no valid layout "
            f"({type(e).__name__}: {e})") from None
    entries = [(i, leaf, name, part) for i, leaf in enumerate(leaves)
               for name, part in _parts(i, leaf[3])]
    sizes = {name: _size(leaf, name) for _, leaf, name, _ in entries}
    arrays = {}
    if any(sizes.values()):
        with _integrity.reading(what, directory, required=["arrays/_METADATA"]):
            with ocp.StandardCheckpointer() as ckptr:
                arrays = {k: np.asarray(v) for k, v in ckptr.restore(directory / "arrays").items()}
    got = {}
    for _, leaf, name, part in entries:
        if name in arrays:
            got[name] = arrays[name]
        elif sizes[name] == 0:  # not stored: orbax refuses zero-size arrays
            got[name] = np.zeros(0, np.uint8 if name.endswith("_bits") else leaf[2])
        else:
            raise _integrity.CorruptCheckpointError(
                f"{what} is damaged: the {part} of '{leaf[0]}' are missing from "
                f"{directory / 'arrays'}")
    sums = info.get("checksums")
    if verify and sums is not None:
        _integrity.verify(what, [f"{leaf[0]} ({part})" for _, leaf, _, part in entries],
                          [sums.get(name) for _, _, name, _ in entries],
                          [got[name] for _, _, name, _ in entries])
    params, masks = [], []
    for i, (path, shape, dtype, masked, _) in enumerate(leaves):
        if not masked:
            params.append(got[f"leaf{i}"].reshape(shape))
            masks.append(None)
            continue
        n = int(np.prod(shape))
        m = np.unpackbits(got[f"leaf{i}_bits"], count=n).astype(bool)
        values = got[f"leaf{i}_values"]
        if int(m.sum()) != values.size:
            raise _integrity.CorruptCheckpointError(
                f"{what} is damaged: the mask of '{path}' keeps {int(m.sum())} entries but "
                f"{values.size} values are stored")
        full = np.zeros(n, dtype)
        full[m] = values
        params.append(full.reshape(shape))
        masks.append(m.reshape(shape))
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, masks)


def _size(leaf: tuple, name: str) -> int:
    """How many entries the array ``name`` of ``leaf`` holds (from the layout)."""
    _, shape, _, _, kept = leaf
    n = int(np.prod(shape))
    if name.endswith("_bits"):
        return (n + 7) // 8
    if name.endswith("_values"):
        return kept if kept is not None else -1  # format 1: unknown, always stored
    return n
