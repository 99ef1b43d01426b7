"""SIGKILL during ``save``, ``save_structured`` and ``export_sparse``: what is
on disk afterwards restores bit-identical to the last complete checkpoint,
or is refused with a clear error; a retry into the same place works.

Each trial forks a writer from a ``forkserver`` that has imported jax, orbax
and jaxprune once (a fresh interpreter costs seconds per trial); the child
initialises its own XLA backend, writes checkpoints in a loop, and is killed
at a random moment."""

import multiprocessing
import re
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

OPS = ("save", "save_structured", "export_sparse")
TRIALS = 21  # 7 per operation


def _params(k):
    rng = np.random.default_rng(k)
    return {"kernel": rng.normal(size=(32, 16)).astype(np.float32),
            "bias": np.full(16, k, np.float32), "dead": rng.normal(size=8).astype(np.float32)}


def _masks(k):
    kernel = _params(k)["kernel"]  # keeps half: the same shapes at every k
    keep = np.argsort(np.argsort(kernel, axis=None)).reshape(kernel.shape) >= kernel.size // 2
    return {"kernel": keep, "bias": None, "dead": np.zeros(8, bool)}  # a fully pruned leaf


def _state(k):
    return {"params": _params(k), "masks": _masks(k), "count": np.int32(k)}


def _sparse(k):
    return jax.tree.map(lambda p, m: p if m is None else np.where(m, p, 0), _params(k),
                        _masks(k), is_leaf=lambda x: x is None)


def _write(root, op, k, mngr=None):
    from jaxprune import checkpoint
    if op == "save":
        checkpoint.save(mngr, k, _state(k))
    elif op == "save_structured":
        checkpoint.save_structured(root / f"c{k}", _params(k), {"step": k})
    else:
        checkpoint.export_sparse(root / f"c{k}", _sparse(k), _masks(k))


def _writer(root, op, ready):
    """Runs in the forked child until killed."""
    from jaxprune import checkpoint
    root, k = Path(root), 0
    mngr = checkpoint.manager(root / "m", max_to_keep=2) if op == "save" else None
    while True:
        _write(root, op, k, mngr)
        if k == 0:
            ready.set()  # one complete checkpoint exists; the kill comes during a later one
        k += 1


def _read(root, op, k):
    from jaxprune import checkpoint
    if op == "save_structured":
        variables, plan = checkpoint.restore_structured(root / f"c{k}")
        assert plan == {"step": k}
        return variables
    params, masks = checkpoint.load_sparse(root / f"c{k}")
    chex.assert_trees_all_equal(masks, _masks(k))
    return params


def _check_after_kill(root, op):
    from jaxprune import checkpoint
    if op == "save":
        with checkpoint.manager(root / "m", max_to_keep=2) as mngr:
            steps = sorted(mngr.all_steps())
            assert steps, "the first complete step is gone"
            chex.assert_trees_all_equal(checkpoint.restore(mngr, _state(steps[-1])),
                                        _state(steps[-1]))
            for s in steps[:-1]:
                # A kill while max_to_keep deletes an old step can leave it half-deleted
                # (orbax deletes in place): restoring it must then be refused, not wrong.
                try:
                    got = checkpoint.restore(mngr, _state(s), step=s)
                except checkpoint.CorruptCheckpointError as e:
                    assert f"step {s} in" in str(e) and "is missing" in str(e), e
                else:
                    chex.assert_trees_all_equal(got, _state(s))
            checkpoint.save(mngr, steps[-1] + 1, _state(steps[-1] + 1))
        return steps[-1] + 1
    names = sorted(p.name for p in root.iterdir())
    complete = sorted(int(n[1:]) for n in names if re.fullmatch(r"c\d+", n))
    assert complete == list(range(len(complete))) and complete, names
    nxt = len(complete)
    # Besides complete checkpoints, only the temporary directory of the one being written.
    assert all(re.fullmatch(rf"c\d+|c{nxt}\.jaxprune-tmp-\w+", n) for n in names), names
    for k in complete[-2:]:
        chex.assert_trees_all_equal(_read(root, op, k), _params(k) if op == "save_structured"
                                    else _sparse(k))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at .*c{nxt}"):
        _read(root, op, nxt)
    _write(root, op, nxt)  # a retry into the interrupted directory works
    chex.assert_trees_all_equal(_read(root, op, nxt), _params(nxt) if op == "save_structured"
                                else _sparse(nxt))
    return nxt


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_only_complete_checkpoints(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["jax", "numpy", "orbax.checkpoint", "jaxprune.checkpoint",
                                __name__])
    rng = np.random.default_rng(0)
    reached = {op: [] for op in OPS}
    for trial in range(TRIALS // len(OPS)):  # the three writers of a round run side by side
        roots = {op: tmp_path / f"{op}{trial}" for op in OPS}
        ready = {op: ctx.Event() for op in OPS}
        children = {op: ctx.Process(target=_writer, args=(str(roots[op]), op, ready[op]),
                                    daemon=True) for op in OPS}
        for op in OPS:
            roots[op].mkdir()
            children[op].start()
        for op in OPS:
            assert ready[op].wait(120), f"the writer for {op} did not start"
        start = time.perf_counter()
        for delay, op in sorted(zip(rng.uniform(0.0, 0.6, len(OPS)), OPS)):
            time.sleep(max(0.0, start + delay - time.perf_counter()))
            children[op].kill()
        for op in OPS:
            children[op].join()
            assert children[op].exitcode == -9
            reached[op].append(_check_after_kill(roots[op], op))
    # The kills landed after different numbers of complete checkpoints.
    assert all(len(set(v)) >= 2 for v in reached.values()), reached
