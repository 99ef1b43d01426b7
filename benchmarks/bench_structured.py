"""Latency of shrunk models vs dense, masked-dense and built-from-scratch models.

Run:  python benchmarks/bench_structured.py [--quick] [--only mlp|cnn|lm|vit]

For an MLP and a small CNN (Flax Linen, hard-coded widths) at about 2x and 4x
fewer FLOPs, reports the jitted forward latency (median and min–max of interleaved runs) of:
  dense      the original model
  masked     the original model with the removed channels zeroed
  scratch    the same module class built at the reduced widths
  shrunk     jaxprune.structured.prune_channels(...).apply
and FLOPs from XLA's cost analysis (targets: shrunk speedup over dense >=
0.9 x the FLOPs reduction, and shrunk within 5% of scratch).

For a pre-LN decoder-only transformer LM and a ViT (LayerNorm over the pruned
residual width, heads, head_dim and MLP width all pruned) at about 2x and 4x
fewer FLOPs, prints the eval forward and a train step (loss, gradients, SGD
update) of the shrunk model under both semantics (``masked``, the default,
which also carries the removed channels' share of every LayerNorm statistic;
``native``) against the same class built at the reduced widths from scratch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import structured as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


def latency_samples(calls: dict, reps: int) -> dict:
    """Seconds of ``reps`` calls of each jitted function (after 3 warm-up
    calls), interleaved so that drift on a shared CPU hits all of them alike."""
    import harness
    jitted = {k: (jax.jit(fn), args) for k, (fn, args) in calls.items()}
    return harness.interleaved({k: (lambda f=f, a=a: jax.block_until_ready(f(*a)))
                                for k, (f, a) in jitted.items()}, reps, warmup=3)


def latencies(calls: dict, reps: int) -> dict:
    """Fastest of ``reps`` interleaved calls of each function."""
    return {k: float(np.min(v)) for k, v in latency_samples(calls, reps).items()}


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
    t = latency_samples({
        "dense": (model.apply, (v, x)),
        "masked": (model.apply, (masked_v, x)),
        "scratch": (scratch.apply, (sv, x)),
        "shrunk": (r.apply, (r.variables, x)),
    }, reps)
    ops = (hlo_ops(r.apply, r.variables, x), hlo_ops(scratch.apply, sv, x))
    import harness
    return [f"{name} {target:g}x", f"{base_widths} → {widths}", f"×{f_dense / f_small:.2f}",
            f"{f_scratch / f_small:.2f}", harness.ms(t["dense"]), harness.ms(t["masked"]),
            harness.ms(t["scratch"]), harness.ms(t["shrunk"]),
            f"×{harness.ratio(t['dense'], t['shrunk']):.2f}",
            f"{100 * (harness.ratio(t['shrunk'], t['scratch']) - 1):+.1f}%",
            f"{ops[0]} / {ops[1]}"]


class Block(nn.Module):
    heads: int
    qkv: int
    mlp: int
    causal: bool

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.qkv)(
            nn.LayerNorm()(x), mask=mask)
        x = x + y
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))


class LM(nn.Module):
    """Pre-LN decoder-only LM (flax examples/lm1b style): learned positions, tied embeddings."""
    widths: tuple = (256, 8, 32, 1024)  # residual, heads, head_dim, mlp
    vocab: int = 2048
    layers: int = 4

    @nn.compact
    def __call__(self, ids):
        d, heads, hd, mlp = self.widths
        embed = nn.Embed(self.vocab, d)
        x = embed(ids) + self.param("pos", nn.initializers.normal(0.02), (1, ids.shape[1], d))
        for _ in range(self.layers):
            x = Block(heads, heads * hd, mlp, True)(x)
        return embed.attend(nn.LayerNorm()(x))


class ViT(nn.Module):
    """ViT with global average pooling (google-research/vision_transformer style)."""
    widths: tuple = (192, 6, 32, 768)
    layers: int = 4

    @nn.compact
    def __call__(self, img):
        d, heads, hd, mlp = self.widths
        x = nn.Conv(d, (4, 4), strides=(4, 4))(img)
        x = x.reshape(x.shape[0], -1, d)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], d))
        for _ in range(self.layers):
            x = Block(heads, heads * hd, mlp, False)(x)
        return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))


def _transformer_widths(base: tuple, s: float) -> tuple:
    # sparsity s removes round(s * n) of every dimension (residual, heads, head_dim, mlp)
    return tuple(n - int(round(s * n)) for n in base)


def train_step(apply):
    """One SGD step of a mean-squared loss on the outputs: gradients and update."""
    def step(v, x):
        loss, g = jax.value_and_grad(lambda v: jnp.mean(apply(v, x) ** 2))(v)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, v, g), loss
    return step


def bench_transformer(name, module_cls, base, x, target, reps):
    model = module_cls(base)
    v = model.init(jax.random.key(0), x)
    f_dense = flops(model.apply, v, x)
    best = None
    for s in np.arange(0.0, 0.8, 0.01):
        w = _transformer_widths(base, s)
        m = module_cls(w)
        f = f_dense / flops(m.apply, jax.eval_shape(m.init, jax.random.key(0), x), x)
        if best is None or abs(np.log(f / target)) < best[0] - 1e-9:
            best = (abs(np.log(f / target)), float(s), w)
    _, s, widths = best
    results = {sem: st.prune_channels(model, v, x, sparsity=s, semantics=sem)
               for sem in ("masked", "native")}
    scratch = module_cls(widths)
    sv = results["masked"].variables  # the class at the reduced widths takes the sliced variables
    assert jax.tree.map(np.shape, jax.eval_shape(scratch.init, jax.random.key(0), x)) == \
        jax.tree.map(np.shape, sv), "scratch widths differ from the plan"
    f_small = flops(results["masked"].apply, sv, x)
    calls = {"scratch": (scratch.apply, (sv, x))}
    calls.update({sem: (r.apply, (r.variables, x)) for sem, r in results.items()})
    t_eval = latency_samples({"dense": (model.apply, (v, x)), **calls}, reps)
    t_train = latency_samples({"dense": (train_step(model.apply), (v, x)),
                               **{k: (train_step(fn), args) for k, (fn, args) in calls.items()}},
                              reps)
    import harness
    rows = []
    for label, t in (("eval", t_eval), ("train", t_train)):
        rows.append([f"{name} {target:g}x {label}", f"{base} → {widths}",
                     f"×{f_dense / f_small:.2f}", harness.ms(t["dense"]), harness.ms(t["scratch"]),
                     harness.ms(t["masked"]), harness.ms(t["native"]),
                     f"×{harness.ratio(t['dense'], t['scratch']):.2f}",
                     f"×{harness.ratio(t['dense'], t['masked']):.2f}",
                     f"×{harness.ratio(t['dense'], t['native']):.2f}",
                     f"{100 * (harness.ratio(t['masked'], t['scratch']) - 1):+.1f}% / "
                     f"{100 * (harness.ratio(t['native'], t['scratch']) - 1):+.1f}%"])
    return rows


def run(quick: bool = False, only: Optional[str] = None, round_to: int = 64,
        cnn_round_to: int = 16, cnn_widths: tuple = (64, 128, 128)) -> str:
    """Markdown: FLOPs reduction and measured latency of dense, masked, from
    scratch and shrunk models (MLP, CNN, LM, ViT) at 2x and 4x fewer FLOPs."""
    import harness
    reps = 5 if quick else 30
    targets = (2.0,) if quick else (2.0, 4.0)
    kinds = [only] if only else (["mlp"] if quick else ["mlp", "cnn", "lm", "vit"])
    x_mlp = jax.random.normal(jax.random.key(2), (256, 512))
    x_img = jax.random.normal(jax.random.key(3), (16, 32, 32, 16))
    ids = jax.random.randint(jax.random.key(4), (8, 128), 0, 2048)
    img = jax.random.normal(jax.random.key(5), (16, 32, 32, 3))
    conv_rows, tf_rows = [], []
    # The sparsity is chosen so that XLA-counted FLOPs fall as close as the
    # rounding allows to 2x and 4x.
    for target in targets:
        if "mlp" in kinds:  # quick: a narrower MLP, fewer candidate widths to compile
            conv_rows.append(bench("mlp", MLP, (512,) * 3 if quick else (2048,) * 3, x_mlp, target,
                                   reps, round_to))
        if "cnn" in kinds:
            conv_rows.append(bench("cnn", CNN, tuple(cnn_widths), x_img, target, reps,
                                   cnn_round_to))
        if "lm" in kinds:
            tf_rows += bench_transformer("lm", LM, (256, 8, 32, 1024), ids, target, reps)
        if "vit" in kinds:
            tf_rows += bench_transformer("vit", ViT, (192, 6, 32, 768), img, target, reps)
    md = ["## Structured pruning: FLOPs vs measured speed-up", "",
          f"Jitted forward latency in ms, median (min–max) of {reps} interleaved runs; speed-up "
          "and the shrunk-vs-scratch gap are medians of per-round ratios. FLOPs from XLA's cost "
          "analysis. *dense*: the original model; *masked*: removed channels zeroed (no "
          "speed-up expected); *scratch*: the same class built at the reduced widths; "
          "*shrunk*: `jaxprune.structured.prune_channels(...).apply`. HLO instructions of shrunk "
          "vs scratch check that both programs do the same work.", ""]
    if conv_rows:
        md += [f"MLP (batch 256 x 512, kept widths multiples of {round_to}) and CNN (16 x 32 x 32 "
               f"x 16 images, multiples of {cnn_round_to}), Flax Linen:", "",
               harness.table(["model", "widths", "FLOPs reduction", "shrunk/scratch FLOPs",
                              "dense ms", "masked ms", "scratch ms", "shrunk ms",
                              "shrunk speed-up", "shrunk vs scratch", "HLO ops shrunk / scratch"],
                             conv_rows), ""]
    if tf_rows:
        md += ["Pre-LN decoder LM (8 x 128 tokens, vocab 2048, 4 layers) and ViT (16 x 32 x 32 x "
               "3, 4 layers): residual width, heads, head_dim and MLP width pruned; eval forward "
               "and a train step (loss, gradients, SGD update) of the shrunk model under "
               "`semantics=\"masked\"` (default; carries the removed channels' share of every "
               "LayerNorm statistic) and `\"native\"`, against the class built at the reduced "
               "widths:", "",
               harness.table(["model", "widths (d, heads, head_dim, mlp)", "FLOPs reduction",
                              "dense ms", "scratch ms", "masked ms", "native ms",
                              "scratch speed-up", "masked speed-up", "native speed-up",
                              "masked / native vs scratch"], tf_rows), ""]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="MLP at 2x only, fewer repetitions")
    parser.add_argument("--round-to", type=int, default=64,
                        help="MLP kept widths are multiples of this (kernels like it)")
    parser.add_argument("--cnn-round-to", type=int, default=16,
                        help="CNN kept channel counts are multiples of this")
    parser.add_argument("--cnn-widths", type=int, nargs=3, default=(64, 128, 128),
                        help="CNN channel widths (XLA:CPU conv speed is not proportional to "
                             "FLOPs at every width; the from-scratch column shows it)")
    parser.add_argument("--only", choices=("mlp", "cnn", "lm", "vit"), default=None)
    args = parser.parse_args()
    print(run(args.quick, args.only, args.round_to, args.cnn_round_to, tuple(args.cnn_widths)))


if __name__ == "__main__":
    main()
