"""Global magnitude mask: radix select (jaxprune) vs concatenate + sort.

Prints, for each model size, the time of one jitted global mask computation
both ways, their ratio, the cost per million parameters (linear growth), and
XLA's temporary-buffer size for each (the sort needs a concatenated copy of
all scores; the radix select needs only histograms and the masks).

    python benchmarks/bench_global_threshold.py [--quick] [--sizes 10 25] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp

import jaxprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_params(n_million: float, key=jax.random.key(0)):
    """MLP-like leaves of 1024 x 4096 (and one remainder leaf) totalling
    ``n_million`` million weights."""
    total, width = int(n_million * 1e6), 1024
    params, i = {}, 0
    while total > 0:
        rows = min(4 * width, max(total // width, 1))
        key, sub = jax.random.split(key)
        params[f"layer_{i}"] = jax.random.normal(sub, (rows, width))
        total -= rows * width
        i += 1
    return params


def sort_baseline(params, sparsity):
    scores = jaxprune.scores.magnitude(params)
    flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(scores)])
    k = jnp.round(sparsity * flat.size).astype(jnp.int32)
    thresh = jnp.sort(flat)[jnp.maximum(k - 1, 0)]
    return jax.tree.map(lambda s: s > thresh, scores)


def radix_select(params, sparsity):
    return jaxprune.masks.unstructured(jaxprune.scores.magnitude(params), sparsity,
                                       scope="global")


def temp_bytes(fn, *args) -> int:
    stats = fn.lower(*args).compile().memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", -1)) if stats is not None else -1


METHODS = {"sort": sort_baseline, "radix": radix_select}


def memory_child(size: float, method: str, sparsity: float) -> dict:
    """In a fresh process: the extra resident memory (MiB) that one call of
    ``method`` needs on top of the parameters and the compiled program (peak
    RSS is reset just before the call through /proc/self/clear_refs)."""
    params = jax.block_until_ready(make_params(size))
    fn = jax.jit(METHODS[method]).lower(params, jnp.float32(sparsity)).compile()
    before = harness_rss("VmRSS")
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    jax.block_until_ready(fn(params, jnp.float32(sparsity)))
    peak = harness_rss("VmHWM")
    return {"params_mib": sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20,
            "before_mib": before, "peak_mib": peak, "extra_mib": peak - before, "reset": reset}


def harness_rss(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(quick: bool = False, sizes=None, repeats: Optional[int] = None,
        sparsity: float = 0.9, sort_upto: float = 25.0) -> str:
    """Markdown: time (median, min–max of interleaved runs), ratio, XLA
    temporary bytes and measured extra peak RSS of both ways, per size."""
    import harness
    sizes = sizes or ([0.25] if quick else [1.0, 10.0, 25.0, 100.0])
    repeats = repeats or (2 if quick else 5)
    base, ours = jax.jit(sort_baseline), jax.jit(radix_select)
    s = jnp.float32(sparsity)
    rows = []
    for size in sizes:
        params = make_params(size)
        n = sum(x.size for x in jax.tree.leaves(params))
        pruned = sum(int((~m).sum()) for m in jax.tree.leaves(ours(params, s)))
        # The sparsity is passed traced (float32), as a schedule would pass it.
        assert pruned == round(float(s) * n), (pruned, n)
        run_sort = size <= sort_upto
        calls = {"radix": lambda: jax.block_until_ready(ours(params, s))}
        if run_sort:
            calls["sort"] = lambda: jax.block_until_ready(base(params, s))
        t = harness.interleaved(calls, repeats if size <= 10 else min(repeats, 3))
        temp = {k: temp_bytes(f, params, s) / 2**20 for k, f in (("sort", base), ("radix", ours))}
        del params
        mem = {k: harness.child([__file__, "--memory-child", str(size), k, str(sparsity)])
               for k in METHODS if run_sort or k == "radix"}
        na = "not run"
        rows.append([f"{n / 1e6:.1f}M", harness.ms(t["sort"], 1) if run_sort else na,
                     harness.ms(t["radix"], 1),
                     f"{harness.ratio(t['sort'], t['radix']):.1f}x" if run_sort else na,
                     f"{1e3 * harness.med(t['radix']) / (n / 1e6):.2f}",
                     f"{temp['sort']:.0f} / {temp['radix']:.0f}",
                     f"{mem['sort']['extra_mib']:.0f}" if run_sort else na,
                     f"{mem['radix']['extra_mib']:.0f}", f"{mem['radix']['params_mib']:.0f}"])
    return "\n".join([
        "## Global magnitude mask: radix select vs sort", "",
        f"One jitted global magnitude mask at {sparsity:.0%} over MLP-like float32 leaves "
        "(1024 x 4096): jaxprune's radix select (`masks.unstructured(scope=\"global\")`) vs "
        "concatenate + sort. Times: median (min–max) of "
        f"{repeats} interleaved runs (3 above 10M); the sort is not run above {sort_upto:g}M "
        "(minutes per call here). Ratio: median of per-round sort/radix. Memory: XLA's "
        "temporary buffers from the compiled program, and the measured extra peak resident "
        "memory of one call on top of the parameters and compiled program (a fresh process "
        "per measurement, peak RSS reset just before the call).", "",
        harness.table(["params", "sort ms", "radix ms", "speed-up", "radix ms/M params",
                       "XLA temp MiB sort / radix", "extra peak RSS MiB sort",
                       "extra peak RSS MiB radix",
                       "params MiB"], rows)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=None,
                        help="model sizes in millions of parameters (default 1 10 25 100)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=3, metavar=("SIZE", "METHOD", "SPARSITY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        size, method, sp = args.memory_child
        print(json.dumps(memory_child(float(size), method, float(sp))))
        return
    print(run(args.quick, args.sizes, args.repeats, args.sparsity))


if __name__ == "__main__":
    main()
