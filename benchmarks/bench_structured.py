"""Latency of shrunk models vs dense, masked-dense and built-from-scratch models.

Run:  python benchmarks/bench_structured.py [--quick]

For an MLP and a small CNN (Flax Linen, hard-coded widths) at about 2x and 4x
fewer FLOPs, prints the jitted forward latency (best of repeated, interleaved runs) of:
  dense      the original model
  masked     the original model with the removed channels zeroed
  scratch    the same module class built at the reduced widths
  shrunk     jaxprune.structured.prune_channels(...).apply
and FLOPs from XLA's cost analysis. Targets: shrunk speedup over dense >=
0.9 x the FLOPs reduction, and shrunk within 5% of scratch.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np

from jaxprune import structured as st


class MLP(nn.Module):
    widths: tuple = (2048, 2048, 2048)

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    widths: tuple = (64, 128, 128)

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Conv(w, (3, 3))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def hlo_ops(fn, *args) -> int:
    """Instructions in XLA's optimised HLO (a noise-free check that two
    programs do the same work)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//"))


def latencies(calls: dict, reps: int) -> dict:
    """Fastest of ``reps`` calls (robust to other processes on a shared CPU);
    the variants are interleaved so drift hits all of them alike."""
    jitted = {k: (jax.jit(fn), args) for k, (fn, args) in calls.items()}
    for fn, args in jitted.values():
        for _ in range(3):
            jax.block_until_ready(fn(*args))
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, (fn, args) in jitted.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.min(v)) for k, v in times.items()}


def sparsity_for(module_cls, base_widths, x, target, round_to, f_dense) -> float:
    """The channel sparsity whose kept widths (rounded as ``select_channels``
    rounds them) bring XLA-counted FLOPs closest to ``target``-fold fewer."""
    best, seen = None, {}
    for s in np.arange(0.0, 0.9, 0.01):
        widths = tuple(min(w, int(np.ceil((w - round(s * w)) / round_to)) * round_to)
                       for w in base_widths)
        if widths not in seen:
            m = module_cls(widths)
            seen[widths] = f_dense / flops(m.apply, jax.eval_shape(m.init, jax.random.key(0), x), x)
        gap = abs(np.log(seen[widths] / target))
        if best is None or gap < best[0] - 1e-9:
            best = (gap, float(s))
    return best[1]


def bench(name, module_cls, base_widths, x, target, reps, round_to):
    model = module_cls(base_widths)
    v = model.init(jax.random.key(0), x)
    sparsity = sparsity_for(module_cls, base_widths, x, target, round_to, flops(model.apply, v, x))
    r = st.prune_channels(model, v, x, sparsity=sparsity, round_to=round_to)
    widths = tuple(len(e["keep"]) for e in r.plan["groups"])
    scratch = module_cls(widths)
    sv = scratch.init(jax.random.key(1), x)
    masked_v = st.zero_removed(v, r.plan)
    f_dense = flops(model.apply, v, x)
    f_small = flops(r.apply, r.variables, x)
    f_scratch = flops(scratch.apply, sv, x)
    t = latencies({
        "dense": (model.apply, (v, x)),
        "masked": (model.apply, (masked_v, x)),
        "scratch": (scratch.apply, (sv, x)),
        "shrunk": (r.apply, (r.variables, x)),
    }, reps)
    ops = (hlo_ops(r.apply, r.variables, x), hlo_ops(scratch.apply, sv, x))
    reduction = f_dense / f_small
    speedup = t["dense"] / t["shrunk"]
    vs_scratch = t["shrunk"] / t["scratch"] - 1
    ok = speedup >= 0.9 * reduction and vs_scratch <= 0.05
    print(f"{name:4s} s={sparsity:.3f} round_to={round_to} widths {base_widths}->{widths} | FLOPs dense {f_dense:.3g} "
          f"shrunk {f_small:.3g} scratch {f_scratch:.3g} (x{reduction:.2f} fewer) | ms dense "
          f"{1e3 * t['dense']:.2f} masked {1e3 * t['masked']:.2f} scratch {1e3 * t['scratch']:.2f} "
          f"shrunk {1e3 * t['shrunk']:.2f} | speedup x{speedup:.2f} (target >= "
          f"{0.9 * reduction:.2f}), vs scratch {100 * vs_scratch:+.1f}% | HLO instructions "
          f"shrunk {ops[0]} scratch {ops[1]} {'OK' if ok else 'MISS'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--round-to", type=int, default=64,
                        help="MLP kept widths are multiples of this (kernels like it)")
    parser.add_argument("--cnn-round-to", type=int, default=16,
                        help="CNN kept channel counts are multiples of this")
    parser.add_argument("--cnn-widths", type=int, nargs=3, default=(64, 128, 128),
                        help="CNN channel widths (XLA:CPU conv speed is not proportional to "
                             "FLOPs at every width; the from-scratch column shows it)")
    parser.add_argument("--only", choices=("mlp", "cnn"), default=None)
    args = parser.parse_args()
    reps = 10 if args.quick else 50
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, best of {reps} reps, "
          f"round_to={args.round_to} (MLP), {args.cnn_round_to} (CNN)")
    x_mlp = jax.random.normal(jax.random.key(2), (256, 512))
    x_img = jax.random.normal(jax.random.key(3), (16, 32, 32, 16))
    results = []
    # The sparsity is chosen so that XLA-counted FLOPs fall as close as the
    # rounding allows to 2x and 4x.
    for target in (2.0, 4.0):
        if args.only in (None, "mlp"):
            results.append(bench("mlp", MLP, (2048, 2048, 2048), x_mlp, target, reps,
                                 args.round_to))
        if args.only in (None, "cnn"):
            results.append(bench("cnn", CNN, tuple(args.cnn_widths), x_img, target, reps,
                                 args.cnn_round_to))
    print(f"{sum(results)}/{len(results)} configurations meet both targets")


if __name__ == "__main__":
    main()
