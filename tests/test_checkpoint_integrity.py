"""jaxprune.checkpoint integrity: checksums catch flipped bits, damaged
metadata is named, interrupted writes leave nothing, empty leaves round-trip."""

import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprune import checkpoint
from jaxprune.checkpoint import _integrity

Damaged = ValueError  # CorruptCheckpointError subclasses it; the message is what counts


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"params": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(64, 16)), jnp.float32),
                                   "bias": jnp.asarray(rng.normal(size=16), jnp.float32)},
                       "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(16, 4)), jnp.bfloat16)}},
            "mask": jnp.asarray(rng.random((64, 16)) < 0.5),
            "count": jnp.asarray(7, jnp.int32)}


def _flip(x, index, bit):
    """``x`` with one bit flipped in the ``index``-th byte of its data."""
    a = np.array(x)
    a.view(np.uint8).reshape(-1)[index] ^= np.uint8(1 << bit)
    return jnp.asarray(a)


def _numpy_checksum(x):
    """The documented hash, written independently with NumPy."""
    a = np.asarray(x)
    a = a.astype(np.uint8) if a.dtype == np.bool_ else a
    words = a.reshape(-1).view(f"u{a.dtype.itemsize}").astype(np.uint32)
    h = words ^ (np.arange(words.size, dtype=np.uint32) * np.uint32(0x9E3779B1))
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return int(h.astype(np.uint64).sum() % 2**32)


def test_checksum_matches_a_numpy_reference_on_every_sharding():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    long = jax.random.normal(jax.random.key(1), (2 * _integrity._CHUNK + 77,))  # chunks + tail
    arrays = [x, x.astype(jnp.bfloat16), jnp.arange(-20, 20, dtype=jnp.int8), x > 0, long,
              (long * 100).astype(jnp.int8), jax.random.key_data(jax.random.key(3)),
              jnp.asarray(5, jnp.int32), jnp.zeros((0, 3))]
    assert _integrity.checksums(arrays) == [_numpy_checksum(a) for a in arrays]
    # The fused pass (sharded arrays, accelerators) equals the chunked one (one CPU device).
    for a in (long, jax.lax.complex(long, -long)):
        assert int(_integrity._leaf_fused(a)) == int(_integrity._leaf_chunked(a))
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded = [jax.device_put(x, NamedSharding(mesh, spec))
               for spec in (P("data", "model"), P(None, "model"), P(("data", "model")))]
    assert _integrity.checksums(sharded) == [_numpy_checksum(x)] * 3
    assert _integrity.checksums([None, x]) == [None, _numpy_checksum(x)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_every_single_bit_flip_and_a_swap_change_the_checksum(dtype):
    x = (jax.random.normal(jax.random.key(1), (4, 8)) * 20).astype(dtype)
    raw = np.asarray(x).view(np.uint8).reshape(-1)
    flips = np.repeat(raw[None], raw.size * 8, axis=0)
    flips[np.arange(raw.size * 8), np.arange(raw.size * 8) // 8] ^= (
        1 << (np.arange(raw.size * 8) % 8)).astype(np.uint8)
    batch = jnp.asarray(flips.view(np.asarray(x).dtype).reshape(-1, 4, 8))
    sums = np.asarray(jax.jit(jax.vmap(_integrity._leaf_checksum))(batch))
    original = _integrity.checksums([x])[0]
    assert (sums != original).all()
    swapped = x.at[0, 0].set(x[1, 1]).at[1, 1].set(x[0, 0])
    assert bool((x[0, 0] != x[1, 1])) and _integrity.checksums([swapped])[0] != original


def _tamper_save(tmp_path, path, index=5, bit=3):
    """A step whose arrays differ in one bit from what its checksums describe:
    step 2 holds the flipped state, its array data is copied over step 1's."""
    state = _state()
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: _flip(x, index, bit) if jax.tree_util.keystr(p, simple=True, separator="/")
        == path else x, state)
    with checkpoint.manager(tmp_path) as mngr:
        checkpoint.save(mngr, 1, state)
        checkpoint.save(mngr, 2, bad)
    shutil.rmtree(tmp_path / "1" / "state")
    shutil.copytree(tmp_path / "2" / "state", tmp_path / "1" / "state")
    return state, bad


@pytest.mark.parametrize("path", ["params/Dense_0/kernel", "params/Dense_1/kernel", "mask"])
def test_restore_of_flipped_bits_raises_naming_the_leaf(tmp_path, path):
    state, bad = _tamper_save(tmp_path, path, index=0 if path == "mask" else 5,
                              bit=0 if path == "mask" else 3)
    with checkpoint.manager(tmp_path) as mngr:
        with pytest.raises(checkpoint.CorruptCheckpointError,
                           match=rf"step 1 in .* is damaged: '{path}' does not match its checksum"):
            checkpoint.restore(mngr, state, step=1)
        unverified = checkpoint.restore(mngr, state, step=1, verify=False)  # what orbax returns
        chex.assert_trees_all_equal(unverified, bad)
        chex.assert_trees_all_equal(checkpoint.restore(mngr, state, step=2), bad)


def test_structured_restore_of_flipped_bits_raises_naming_the_leaf(tmp_path):
    small = {"params": {"Dense_0": {"kernel": jnp.ones((8, 10)), "bias": jnp.arange(10.0)}}}
    bad = {"params": {"Dense_0": {"kernel": small["params"]["Dense_0"]["kernel"],
                                  "bias": _flip(small["params"]["Dense_0"]["bias"], 9, 7)}}}
    checkpoint.save_structured(tmp_path / "good", small, {"v": 1})
    checkpoint.save_structured(tmp_path / "bad", bad, {"v": 1})
    shutil.rmtree(tmp_path / "good" / "variables")
    shutil.copytree(tmp_path / "bad" / "variables", tmp_path / "good" / "variables")
    with pytest.raises(Damaged, match=r"damaged: 'params/Dense_0/bias' does not match"):
        checkpoint.restore_structured(tmp_path / "good")


def test_sparse_load_of_flipped_bits_raises_naming_the_leaf(tmp_path):
    params = {"w": jax.random.normal(jax.random.key(0), (16, 16)), "b": jnp.ones(16)}
    masks = {"w": params["w"] > 0, "b": None}
    checkpoint.export_sparse(tmp_path / "good", params, masks)
    bad = {"w": _flip(params["w"], 2, 6), "b": params["b"]}  # a kept value (w[0, 0] > 0)
    assert bool(masks["w"][0, 0])
    checkpoint.export_sparse(tmp_path / "bad", bad, masks)
    shutil.rmtree(tmp_path / "good" / "arrays")
    shutil.copytree(tmp_path / "bad" / "arrays", tmp_path / "good" / "arrays")
    with pytest.raises(Damaged, match=r"damaged: 'w \(kept values\)' does not match"):
        checkpoint.load_sparse(tmp_path / "good")


def _differs(a, b):
    return [p for (p, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                                        jax.tree_util.tree_leaves_with_path(b))
            if not np.array_equal(np.asarray(x), np.asarray(y))]


def test_random_bit_flips_in_data_files_restore_bit_identical_or_raise(tmp_path):
    """The issue's probe: flip 1-3 random bits of the compressed array data.
    Orbax alone restores some of them silently wrong; with checksums every
    trial either restores bit-identical or raises, naming the first wrong leaf."""
    state = _state()
    with checkpoint.manager(tmp_path / "clean") as mngr:
        checkpoint.save(mngr, 1, state)
    rng = np.random.default_rng(0)
    silent = 0
    for trial in range(8):
        root = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "clean", root)
        files = sorted((root / "1" / "state" / "ocdbt.process_0" / "d").iterdir())
        sizes = np.array([f.stat().st_size for f in files])
        for _ in range(rng.integers(1, 4)):
            f = files[rng.choice(len(files), p=sizes / sizes.sum())]
            data = bytearray(f.read_bytes())
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
            f.write_bytes(bytes(data))
        with checkpoint.manager(root) as mngr:
            try:
                unverified = checkpoint.restore(mngr, state, verify=False)
            except checkpoint.CorruptCheckpointError:
                unverified = None
            wrong = [] if unverified is None else _differs(unverified, state)
            if unverified is not None and not wrong:
                chex.assert_trees_all_equal(checkpoint.restore(mngr, state), state)
                continue
            silent += bool(wrong)
            first = "" if not wrong else jax.tree_util.keystr(wrong[0], simple=True, separator="/")
            with pytest.raises(checkpoint.CorruptCheckpointError, match=f"damaged: .*{first}"):
                checkpoint.restore(mngr, state)
    assert silent >= 1  # the trials did reach data that orbax reads back wrong


def _damage(file: Path, how: str) -> None:
    if how == "delete":
        file.unlink()
    elif how == "garbage":
        file.write_bytes(b"\xff\xfe\x00" + file.read_bytes()[3:])
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _check_named(pristine, copy, cases, load):
    for name, how in cases:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(pristine, copy)
        _damage(copy / name, how)
        with pytest.raises(Damaged, match=rf"damaged: {copy / name} is "
                                          rf"({'missing' if how == 'delete' else 'not valid JSON'})"):
            load(copy)


_JSON_DAMAGE = ("garbage", "truncate", "delete")


def test_damaged_or_missing_metadata_of_a_step_is_named(tmp_path):
    state = _state()
    with checkpoint.manager(tmp_path / "clean") as mngr:
        checkpoint.save(mngr, 1, state)

    def load(root):
        with checkpoint.manager(root) as mngr:
            return checkpoint.restore(mngr, state)

    cases = [(f"1/{n}", how) for n in ("jaxprune/metadata", "state/_METADATA")
             for how in _JSON_DAMAGE]
    cases += [("1/state/array_metadatas/process_0", how) for how in ("garbage", "truncate")]
    _check_named(tmp_path / "clean", tmp_path / "copy", cases, load)


def test_damaged_or_missing_files_of_structured_and_sparse_checkpoints_are_named(tmp_path):
    small = {"params": {"kernel": jnp.ones((4, 3)), "bias": jnp.arange(3.0)}}
    checkpoint.save_structured(tmp_path / "s", small, {"v": 1})
    cases = [(n, how) for n in ("variables.json", "plan.json", "variables/_METADATA")
             for how in _JSON_DAMAGE]
    _check_named(tmp_path / "s", tmp_path / "s_copy", cases, checkpoint.restore_structured)
    params = {"w": jnp.arange(16.0).reshape(4, 4), "b": jnp.ones(4)}
    checkpoint.export_sparse(tmp_path / "e", params, {"w": params["w"] > 5, "b": None})
    cases = [(n, how) for n in ("sparse.json", "arrays/_METADATA") for how in _JSON_DAMAGE]
    _check_named(tmp_path / "e", tmp_path / "e_copy", cases, checkpoint.load_sparse)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("api", ["save_structured", "export_sparse"])
def test_interrupted_write_leaves_nothing_and_a_retry_succeeds(tmp_path, monkeypatch, api):
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    write = {"save_structured": lambda d: checkpoint.save_structured(d, params, {"v": 1}),
             "export_sparse": lambda d: checkpoint.export_sparse(
                 d, params, {"w": params["w"] > 3, "b": None})}[api]
    read = {"save_structured": lambda d: checkpoint.restore_structured(d)[0],
            "export_sparse": lambda d: checkpoint.load_sparse(d)[0]}[api]
    expected = {"w": np.where(np.asarray(params["w"]) > 3, params["w"], 0) if
                api == "export_sparse" else params["w"], "b": params["b"]}
    with monkeypatch.context() as m:  # fails after the arrays are written
        m.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
        with pytest.raises(_Interrupt):
            write(tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read(tmp_path / "out")
    (tmp_path / "leftover.jaxprune-tmp-0").mkdir()  # what a SIGKILL leaves (other name: kept)
    (tmp_path / "out.jaxprune-tmp-dead").mkdir()  # what a SIGKILL during this write leaves
    with pytest.raises(FileNotFoundError, match="out.jaxprune-tmp-dead is what an interrupted"):
        read(tmp_path / "out")
    write(tmp_path / "out")
    chex.assert_trees_all_equal(read(tmp_path / "out"), jax.tree.map(np.asarray, expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leftover.jaxprune-tmp-0", "out"]
    with pytest.raises(FileExistsError, match="not empty"):
        write(tmp_path / "out")


def test_export_sparse_round_trips_fully_pruned_and_zero_size_leaves(tmp_path):
    params = {"dead": jnp.arange(1.0, 13.0).reshape(3, 4), "live": jnp.arange(6.0),
              "empty": jnp.zeros((0, 5)), "dense": jnp.ones(3, jnp.bfloat16),
              "dense_empty": jnp.zeros(0, jnp.int32)}
    masks = {"dead": jnp.zeros((3, 4), bool), "live": jnp.arange(6) % 2 == 0,
             "empty": jnp.zeros((0, 5), bool), "dense": None, "dense_empty": None}
    sparse = jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, 0), params, masks,
                          is_leaf=lambda x: x is None)
    checkpoint.export_sparse(tmp_path / "e", sparse, masks)
    got, got_masks = checkpoint.load_sparse(tmp_path / "e")
    chex.assert_trees_all_equal_shapes_and_dtypes(got, jax.tree.map(np.asarray, sparse))
    chex.assert_trees_all_equal(got, jax.tree.map(np.asarray, sparse))
    assert got_masks["dense"] is None and got_masks["dense_empty"] is None
    for k in ("dead", "live", "empty"):
        np.testing.assert_array_equal(got_masks[k], masks[k])
    everything_pruned = {"w": jnp.zeros((2, 2))}
    checkpoint.export_sparse(tmp_path / "none", everything_pruned, {"w": jnp.zeros((2, 2), bool)})
    np.testing.assert_array_equal(checkpoint.load_sparse(tmp_path / "none")[0]["w"],
                                  np.zeros((2, 2), np.float32))


def test_zero_size_leaves_round_trip_through_save_and_save_structured(tmp_path):
    state = {"w": jnp.ones((2, 3)), "empty": jnp.zeros((0, 4), jnp.bfloat16),
             "count": jnp.asarray(3)}
    with checkpoint.manager(tmp_path / "m") as mngr:
        checkpoint.save(mngr, 0, state)
        got = checkpoint.restore(mngr, jax.eval_shape(lambda: state))
    chex.assert_trees_all_equal_shapes_and_dtypes(got, state)
    chex.assert_trees_all_equal(got, state)
    checkpoint.save_structured(tmp_path / "s", state, {})
    chex.assert_trees_all_equal(checkpoint.restore_structured(tmp_path / "s")[0], state)


def test_sharded_checkpoint_verifies_on_another_sharding_and_catches_a_flip(tmp_path):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    x = jax.random.normal(jax.random.key(0), (8, 16))
    state = {"w": jax.device_put(x, NamedSharding(mesh, P("data", "model")))}
    with checkpoint.manager(tmp_path) as mngr:
        checkpoint.save(mngr, 0, state)
        checkpoint.save(mngr, 1, {"w": jax.device_put(_flip(x, 100, 2),
                                                      NamedSharding(mesh, P("data", "model")))})
        for spec in (P(None, "model"), P()):
            target = {"w": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=NamedSharding(mesh, spec))}
            got = checkpoint.restore(mngr, target, step=0)
            assert got["w"].sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
            np.testing.assert_array_equal(got["w"], x)
    shutil.rmtree(tmp_path / "0" / "state")
    shutil.copytree(tmp_path / "1" / "state", tmp_path / "0" / "state")
    with checkpoint.manager(tmp_path) as mngr:
        with pytest.raises(checkpoint.CorruptCheckpointError, match="'w' does not match"):
            checkpoint.restore(mngr, {"w": jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=NamedSharding(mesh, P(None, "model")))}, step=0)

