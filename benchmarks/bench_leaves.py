"""Compile time and mask-update cost as the number of leaves grows.

MLPs of ``L`` layers of ``d x d`` kernels (``L`` leaves, ``x -> tanh(x @ W)``)
trained by a jitted step (forward, backward, optimizer, masks). Variants:
plain ``optax.adam``; ``adam + jaxprune.prune`` (90% magnitude) whose masks
are set at step 0 only ("ordinary" steps), or recomputed at every step with
local or global scope ("update" steps); ``jaxprune.pruned(adam)`` updating
masks every step; ``jaxprune.rigl(adam)`` and ``jaxprune.sparse_evolutionary(adam)`` (SET)
dropping and growing every step.

``--model transformer`` and ``--model scanned`` measure the same variants on
a GPT-style pre-LN decoder in Flax Linen of ``--layers`` layers (16 leaves
per layer, 6 of them kernels, plus embedding, final norm and head): unrolled, as ``nn.Module`` code usually is, or with the layers
under ``nn.scan`` (one stacked leaf per weight) and masks per layer slice
(``layer_axis``). These are what a user's step compiles: attention,
LayerNorm and the cross-entropy make plain optax's program larger than the
MLP's, so they show the ratio a real model sees.

Compile time is ``jax.jit(step).lower(...).compile()`` (tracing included,
a fresh ``jit`` each time so no cache is hit). Step times are interleaved
round by round; ratios are medians of per-round ratios against plain adam
in the same round. Figures: median [min-max] over the repeats.

    python benchmarks/bench_leaves.py [--quick] [--leaves 8 128 512] [--width 256]
    python benchmarks/bench_leaves.py --model transformer scanned --layers 12 24 --lm-width 128
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import jaxprune

FULL = dict(leaves=(8, 128, 512), width=256, compile_repeats=2, step_repeats=7, burst_s=0.05)
QUICK = dict(leaves=(4, 16), width=64, compile_repeats=1, step_repeats=5, burst_s=0.002)
# Transformers: --leaves counts layers.
FULL_LM = dict(leaves=(12, 24), width=128, compile_repeats=2, step_repeats=7, burst_s=0.05)
QUICK_LM = dict(leaves=(1,), width=16, compile_repeats=1, step_repeats=3, burst_s=0.002)
QUICK_LM_VARIANTS = ("adam", "local")  # a smoke run of the decoder code paths
VOCAB, SEQ, BATCH, HEADS = 512, 32, 8, 4


def init(n_leaves: int, width: int, key=jax.random.key(0)) -> dict:
    keys = jax.random.split(key, n_leaves)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (width, width)) / width ** 0.5}
            for i, k in enumerate(keys)}


def loss_fn(params, x):
    for i in range(len(params)):
        x = jnp.tanh(x @ params[f"Dense_{i}"]["kernel"])
    return jnp.mean(x ** 2)


class Block(nn.Module):
    """A pre-LN decoder block (GPT-2 / nanoGPT layout): causal self-attention
    and a 4x GELU MLP, each in a residual branch."""
    width: int

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm()(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h, mask=mask)
        h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
        return x + nn.Dense(self.width)(nn.gelu(h)), None


class Decoder(nn.Module):
    """Token and position embeddings, ``layers`` blocks (unrolled or under
    ``nn.scan``), a final LayerNorm and an untied head."""
    layers: int
    width: int
    scanned: bool

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, self.width)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, self.width))
        if self.scanned:
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=self.layers)
            x, _ = blocks(self.width, name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.width, name=f"layers_{i}")(x)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def init_lm(layers: int, width: int, scanned: bool):
    model = Decoder(layers, width, scanned)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, VOCAB)
    params = model.init(jax.random.key(0), tokens[:, :-1])["params"]

    def loss(p, t):
        logits = model.apply({"params": p}, t[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()
    return params, tokens, loss


def variants(layer_axis=None) -> dict:
    adam = optax.adam(1e-3)
    every = jaxprune.schedules.constant(0.9, every=1)
    kw = {} if layer_axis is None else dict(layer_axis=layer_axis)
    return {
        "adam": adam,
        # Masks set at step 0 only: every step measured is an ordinary step.
        "ordinary": optax.chain(adam, jaxprune.prune(
            sparsity=jaxprune.schedules.constant(0.9), scope="local", **kw)),
        "local": optax.chain(adam, jaxprune.prune(sparsity=every, scope="local", **kw)),
        "global": optax.chain(adam, jaxprune.prune(sparsity=every, scope="global", **kw)),
        "pruned": jaxprune.pruned(adam, sparsity=every, scope="local", **kw),
        "rigl": jaxprune.rigl(adam, 0.9, every=1, end=10**9, distribution="uniform", **kw),
        "set": jaxprune.sparse_evolutionary(adam, 0.9, every=1, end=10**9,
                                            distribution="uniform", **kw),
    }


def make_step(tx, loss=loss_fn):
    def step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    return step


def _fmt(values, unit_scale=1.0, digits=2) -> str:
    v = [x * unit_scale for x in values]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def _problem(model: str, n: int, width: int):
    """(params, batch, loss, layer_axis) of an MLP of ``n`` leaves or a
    decoder of ``n`` layers."""
    if model == "mlp":
        return init(n, width), jax.random.normal(jax.random.key(1), (32, width)), loss_fn, None
    params, tokens, loss = init_lm(n, width, scanned=model == "scanned")
    # Scanned: every leaf under "layers" stacks the layers on axis 0.
    return params, tokens, loss, ({"layers": 0} if model == "scanned" else None)


def measure(n_leaves: int, width: int, compile_repeats: int, step_repeats: int,
            names=None, model: str = "mlp", burst_s: float = 0.05) -> dict:
    first, x, loss, layer_axis = _problem(model, n_leaves, width)
    txs = variants(layer_axis)
    names = list(names or txs)
    compile_s = {k: [] for k in names}
    compiled, carries = {}, {}
    for name in names:
        tx = txs[name]
        params = _problem(model, n_leaves, width)[0]  # fresh buffers: the step donates them
        state = tx.init(params)
        step = make_step(tx, loss)
        for _ in range(compile_repeats):
            start = time.perf_counter()
            # A fresh jit each time: nothing is reused from a cache.
            exe = jax.jit(functools.partial(step), donate_argnums=(0, 1)).lower(
                params, state, x).compile()
            compile_s[name].append(time.perf_counter() - start)
        compiled[name] = exe
        carry = exe(params, state, x)          # step 0 (masks set)
        carries[name] = jax.block_until_ready(exe(*carry, x))
    # A timing of one millisecond step is mostly noise: each timing runs a
    # burst of steps that together take about burst_s.
    burst = _burst(compiled[names[0]], carries, names[0], x, burst_s)
    step_s = {k: [] for k in names}
    for _ in range(step_repeats):
        for name in names:  # interleaved: machine noise hits all variants alike
            start = time.perf_counter()
            for _ in range(burst):
                carries[name] = compiled[name](*carries[name], x)
            jax.block_until_ready(carries[name])
            step_s[name].append((time.perf_counter() - start) / burst)
    del carries
    return dict(compile=compile_s, step=step_s, leaves=len(jax.tree.leaves(first)), burst=burst)


def _burst(exe, carries: dict, name: str, x, seconds: float) -> int:
    """Steps per timing: enough that a burst of the first variant's steps
    lasts about ``seconds``."""
    start = time.perf_counter()
    carries[name] = jax.block_until_ready(exe(*carries[name], x))
    once = time.perf_counter() - start
    return max(1, min(200, round(seconds / max(once, 1e-6))))


def describe(model: str, width: int) -> tuple[str, str]:
    """(what the table measures, its first column's name)."""
    if model == "mlp":
        return f"MLP of L leaves of {width}x{width}", "leaves"
    how = ("layers under nn.scan, masks per layer slice (layer_axis)" if model == "scanned"
           else "layers unrolled")
    return (f"GPT-style decoder of L layers, width {width}, {HEADS} heads, vocab {VOCAB}, "
            f"batch {BATCH} x {SEQ} tokens, {how}; leaves: parameter leaves of the model"), "layers (leaves)"


def table(results: dict, width: int, model: str = "mlp") -> str:
    names = list(next(iter(results.values()))["compile"])
    what, first = describe(model, width)
    rows = {(n if model == "mlp" else f"{n} ({r['leaves']})"): r for n, r in results.items()}
    results = rows
    lines = [f"Compile time (s) of the jitted training step, {what}; "
             "ratio: median / plain adam's median.", "",
             f"| {first} | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for n, r in results.items():
        base = statistics.median(r["compile"]["adam"])
        cells = [f"{_fmt(r['compile'][k])} ({statistics.median(r['compile'][k]) / base:.1f}x)"
                 for k in names]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    bursts = ", ".join(f"{r['burst']} at {n}" for n, r in results.items())
    lines += ["", f"Step time (ms), same models; ratio: median of per-round ratios to plain "
              "adam (ordinary: masks fixed; local/global/pruned/rigl/set: masks recomputed every "
              f"step); each timing is a burst of consecutive steps ({bursts}).",
              "",
              f"| {first} | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for n, r in results.items():
        t = r["step"]
        cells = []
        for k in names:
            ratio = statistics.median(a / b for a, b in zip(t[k], t["adam"]))
            cells.append(f"{_fmt(t[k], 1e3)} ({ratio:.2f}x)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tables(model: str, quick: bool, sizes, width, names) -> str:
    cfg = dict((QUICK if quick else FULL) if model == "mlp" else (QUICK_LM if quick else FULL_LM))
    if sizes:
        cfg["leaves"] = tuple(sizes)
    if width:
        cfg["width"] = width
    results = {}
    for n in cfg["leaves"]:
        results[n] = measure(n, cfg["width"], cfg["compile_repeats"], cfg["step_repeats"], names,
                             model, cfg["burst_s"])
    return table(results, cfg["width"], model)


def run(quick: bool = False, leaves=None, width=None, names=None, models=None,
        layers=None, lm_width=None) -> str:
    """Runs the measurements and returns them as a Markdown section: the MLP
    tables (``leaves``, ``width``), then the unrolled and scanned decoders
    (``layers``, ``lm_width``)."""
    models = list(models or ("mlp", "transformer", "scanned"))
    head = (f"## Leaves: compile time and mask-update cost vs number of leaves\n\n"
            f"`python benchmarks/bench_leaves.py{' --quick' if quick else ''}` "
            f"({jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}); "
            "median [min-max].\n\n")
    parts = []
    for model in models:
        sizes, w = (leaves, width) if model == "mlp" else (layers, lm_width)
        chosen = names or (list(QUICK_LM_VARIANTS) if quick and model != "mlp" else None)
        parts.append(f"### {model}\n\n" + _tables(model, quick, sizes, w, chosen))
    return head + "\n\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--leaves", type=int, nargs="*")
    parser.add_argument("--width", type=int)
    parser.add_argument("--variants", nargs="*", help="subset of: " + " ".join(variants()))
    parser.add_argument("--model", nargs="*", choices=("mlp", "transformer", "scanned"),
                        help="default: all three")
    parser.add_argument("--layers", type=int, nargs="*", help="decoder layers (default 12 24)")
    parser.add_argument("--lm-width", type=int, help="decoder width (default 128)")
    args = parser.parse_args(argv)
    names = args.variants
    if names and "adam" not in names:
        names = ["adam"] + names
    print(run(args.quick, args.leaves, args.width, names, args.model, args.layers,
              args.lm_width))


if __name__ == "__main__":
    main()
