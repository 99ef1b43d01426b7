"""What keeps checkpoints honest: per-array checksums, named damage, atomic directories.

* ``checksums``: one 32-bit checksum per array, computed by a jitted
  reduction where the array lives (each device hashes its own shards and
  only a scalar per array is reduced), so no host copy is made and an
  array restored onto another sharding or mesh verifies against the same
  number. The hash: every 32-bit word ``w_i`` of the array (1- and 2-byte
  elements widened to a word, 8-byte elements split into two) at row-major
  position ``i`` contributes ``fmix32(w_i ^ i * 0x9E3779B1)`` (the MurmurHash3
  finaliser, a bijection with full avalanche), summed modulo ``2**32``. The
  sum does not depend on how the array is split into shards or in which
  order they are added; any change confined to one word always changes it,
  and independent changes in several words escape it with probability
  about ``2**-32``, as for CRC32.
* ``reading``: turns what orbax raises on damaged files (raw
  ``JSONDecodeError``, ``UnicodeDecodeError``, pytree and TensorStore
  errors) into a ``CorruptCheckpointError`` naming the damaged or missing
  file.
* ``atomic_directory``: writes a new directory under a temporary name and
  renames it when complete, so an interrupted write never leaves anything
  that a restore takes for a checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CHECKSUM = "fmix32-sum"  # stored with the checksums, so another hash could follow
_TMP = ".jaxprune-tmp-"
# The JSON files that orbax (and jaxprune) write inside a checkpoint.
_JSON_NAMES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata", "variables.json",
               "plan.json", "sparse.json"}
# How TensorStore reports unreadable array data (a ValueError or plain Exception).
_DATA_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "Error reading",
                "error while reading", "FAILED_PRECONDITION")


class CorruptCheckpointError(ValueError):
    """A checkpoint is damaged: an array does not match its checksum, or a
    file is missing or unreadable. The message names the leaf path or file."""


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element up to 4 bytes)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte elements gain a last axis of 2


def _terms(w: jax.Array, start: Any) -> jax.Array:
    """Hash terms of the words ``w`` (any shape) whose row-major positions in
    the whole array begin at ``start``."""
    position = jnp.zeros(w.shape, jnp.uint32) + jnp.asarray(start, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(
            stride % 2**32)
        stride *= w.shape[d]
    return _fmix32(w ^ (position * jnp.uint32(0x9E3779B1)))


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """The checksum as one fused reduction: any sharding, any backend."""
    terms = _terms(_words(x), 0)
    if terms.ndim > 1:
        terms = jnp.sum(terms, axis=-1, dtype=jnp.uint32)
    return jnp.sum(terms, dtype=jnp.uint32)


_CHUNK = 1 << 16


def _leaf_checksum_chunked(x: jax.Array) -> jax.Array:
    """The same checksum over the flattened array in chunks of ``_CHUNK``
    elements: XLA:CPU runs a fused integer reduction over a whole array as a
    scalar loop (and copies a whole-array bitcast), a loop over cache-sized
    chunks is about 4x faster. For arrays on one device (flattening a
    sharded array would move data)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    flat = x.reshape(-1)
    per = max(1, jnp.dtype(flat.dtype).itemsize // 4)  # words per element
    whole = flat.size // _CHUNK

    def chunk_sum(chunk, first_element):
        w = _words(chunk).reshape(-1)  # bitcast the chunk, not the whole array
        return jnp.sum(_terms(w, first_element * jnp.uint32(per)), dtype=jnp.uint32)

    def add_chunk(i, acc):
        chunk = lax.dynamic_slice(flat, (i * _CHUNK,), (_CHUNK,))
        return acc + chunk_sum(chunk, i.astype(jnp.uint32) * jnp.uint32(_CHUNK))

    acc = lax.fori_loop(0, whole, add_chunk, jnp.uint32(0)) if whole else jnp.uint32(0)
    return acc + chunk_sum(flat[whole * _CHUNK:], jnp.uint32((whole * _CHUNK) % 2**32))


# One program per leaf signature (shape, dtype, sharding): leaves that share
# one (params and their optimizer moments) share it, and a run that saves the
# same state every N steps compiles nothing after the first save.
_leaf_fused = jax.jit(_leaf_checksum)
_leaf_chunked = jax.jit(_leaf_checksum_chunked)


def _one_cpu_device(x: Any) -> bool:
    sharding = getattr(x, "sharding", None)
    if sharding is None:  # host data goes to the default device
        return jax.devices()[0].platform == "cpu"
    return len(sharding.device_set) == 1 and next(iter(sharding.device_set)).platform == "cpu"


def checksums(leaves: Sequence[Any]) -> list[Optional[int]]:
    """The checksum of each array in ``leaves`` (``None`` for ``None``),
    computed where each array lives; one transfer of the scalars at the end."""
    pending = [None if x is None else (_leaf_chunked if _one_cpu_device(x) else _leaf_fused)(x)
               for x in leaves]
    return [None if v is None else int(v) for v in jax.device_get(pending)]


def verify(what: str, paths: Sequence[str], stored: Sequence[Optional[int]],
           leaves: Sequence[Any]) -> None:
    """Raises ``CorruptCheckpointError`` naming the first of ``paths`` whose
    restored leaf does not match its stored checksum."""
    got = checksums(leaves)
    bad = [i for i, (s, g) in enumerate(zip(stored, got)) if s != g]
    if len(stored) != len(got):
        raise CorruptCheckpointError(f"{what} is damaged: {len(stored)} checksums stored for "
                                     f"{len(got)} arrays")
    if bad:
        i = bad[0]
        more = f" ({len(bad) - 1} more leaves damaged too)" if len(bad) > 1 else ""
        raise CorruptCheckpointError(
            f"{what} is damaged: '{paths[i]}' does not match its checksum (stored "
            f"{_hex(stored[i])}, read {_hex(got[i])}){more}")


def _hex(v: Optional[int]) -> str:
    return "none" if v is None else f"{v:#010x}"


def _first_damaged_file(root: Path, required: Sequence[str]) -> Optional[str]:
    for name in required:
        if not (root / name).exists():
            return f"{root / name} is missing"
    for f in sorted(root.rglob("*")):
        if f.is_file() and (f.name in _JSON_NAMES or f.parent.name == "array_metadatas"):
            try:
                json.loads(f.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                return f"{f} is not valid JSON ({type(e).__name__}: {e})"
    return None


def _is_data_error(e: BaseException) -> bool:
    return isinstance(e, (UnicodeDecodeError, json.JSONDecodeError, FileNotFoundError,
                          EOFError)) or any(s in str(e) for s in _DATA_ERRORS)


@contextlib.contextmanager
def reading(what: str, root: Union[str, Path], required: Sequence[str] = ()) -> Iterator[None]:
    """Runs an orbax read of the checkpoint at ``root``; what fails because
    a file is damaged or missing becomes a ``CorruptCheckpointError`` naming
    the file (other errors pass unchanged). Each of ``required`` must exist
    even where orbax could do without it: a checkpoint missing one is damaged."""
    local = "://" not in str(root)  # on gs:// etc. only orbax's own errors
    for name in required if local else ():
        if not (Path(root) / name).exists():
            raise CorruptCheckpointError(f"{what} is damaged: {Path(root) / name} is missing")
    try:
        yield
    except CorruptCheckpointError:
        raise
    except Exception as e:  # orbax and TensorStore raise many types for one cause
        damaged = _first_damaged_file(Path(root), required) if local else None
        if damaged is not None:
            raise CorruptCheckpointError(f"{what} is damaged: {damaged}") from e
        if _is_data_error(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptCheckpointError(
                f"{what} is damaged: its array data could not be read ({first})") from e
        raise


def load_json(what: str, file: Path) -> Any:
    """Reads a JSON file of a checkpoint; a missing or damaged one raises
    ``CorruptCheckpointError`` naming it."""
    try:
        return json.loads(Path(file).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} is damaged: {file} is missing") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{what} is damaged: {file} is not valid JSON "
                                     f"({type(e).__name__}: {e})") from None


def check_complete(directory: Path, what: str, names: Sequence[str]) -> None:
    """Raises ``FileNotFoundError`` if ``directory`` does not exist (naming a
    leftover of an interrupted write), ``CorruptCheckpointError`` if it lacks
    one of ``names``."""
    if not directory.is_dir():
        left = sorted(directory.parent.glob(glob.escape(directory.name) + _TMP + "*"))
        hint = (f"; {left[0].name} is what an interrupted {what} left, not a checkpoint"
                if left else "")
        raise FileNotFoundError(f"no checkpoint at {directory}{hint}")
    for name in names:
        if not (directory / name).exists():
            raise CorruptCheckpointError(
                f"checkpoint {directory} is damaged: {directory / name} is missing (or the "
                f"directory was not written by {what})")


@contextlib.contextmanager
def atomic_directory(directory: Path, what: str) -> Iterator[Path]:
    """Yields a temporary sibling of ``directory`` to write into, renamed to
    ``directory`` once the block completes; on an error it is removed, and
    leftovers of an earlier interrupted write are removed first."""
    directory = Path(directory).absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} is not empty; {what} writes a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(glob.escape(directory.name) + _TMP + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.parent / f"{directory.name}{_TMP}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, directory)  # replaces an empty directory; atomic on POSIX
        except OSError as e:
            raise FileExistsError(f"{directory} appeared while {what} wrote it ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_empty_array(x: Any) -> bool:
    """Zero-size arrays, which orbax refuses to save: stored as their shape."""
    return x is not None and hasattr(x, "shape") and int(np.prod(np.shape(x))) == 0
