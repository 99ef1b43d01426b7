"""One-shot pruning of a small language model: magnitude vs Wanda vs SparseGPT.

Trains a byte-level decoder-only transformer (Flax Linen) on the Python
standard library's own source files (offline text, nothing downloaded), then
prunes every linear layer of its transformer blocks at 50% unstructured and
2:4 with ``jaxprune.oneshot`` from 32 calibration sequences of the training
text (sequential: stage by stage), and prints held-out perplexities (as in Table 3 of the Wanda paper:
dense < SparseGPT ≲ Wanda < magnitude).

    python examples/oneshot_lm.py              # ~1-2 minutes on 2 CPU cores
    python examples/oneshot_lm.py --smoke      # tiny model, 2:4 only, well under a minute (or JAXPRUNE_SMOKE=1)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import sysconfig
import time
from typing import Optional

import numpy as np

WHERE = r"Block_\d+/.*kernel$"  # the linear layers of the transformer blocks, as the papers prune


@dataclasses.dataclass
class Config:
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    seq_len: int = 64
    batch: int = 32
    steps: int = 1000
    lr: float = 5e-3
    corpus_bytes: int = 1_500_000
    calib: int = 32          # calibration sequences (the papers use 128 of 2048 tokens)
    eval_seqs: int = 128
    seed: int = 0
    mlp_hidden: int = 0      # 0: 8/3 of d_model (LLaMA), rounded down to a multiple of 8


# The slow test prunes the default model (trained once, then cached) from fewer sequences.
TEST = Config(calib=16, eval_seqs=64)
SMOKE = Config(layers=1, d_model=32, heads=2, seq_len=32, batch=16, steps=20, lr=1e-2,
               corpus_bytes=200_000, calib=8, eval_seqs=8)


def corpus(n_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) bytes from the standard library's .py files:
    every 10th file (sorted by path) is held out for validation."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, val = [], []
    size = 0
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            data = f.read()
        (val if i % 10 == 9 else train).append(data)
        size += len(data)
        if size >= n_bytes:
            break
    as_array = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8).astype(np.int32)
    return as_array(train), as_array(val)


def make_model(cfg: Config):
    """A LLaMA-style decoder (the family both papers prune): pre-RMSNorm
    blocks of bias-free causal attention and a SwiGLU MLP."""
    import flax.linen as nn

    hidden = cfg.mlp_hidden or 8 * (cfg.d_model * 8 // 3 // 8)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.RMSNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=cfg.heads, use_bias=False)(h, h, mask=mask)
            h = nn.RMSNorm()(x)
            gate = nn.Dense(hidden, use_bias=False, name="gate")(h)
            up = nn.Dense(hidden, use_bias=False, name="up")(h)
            return x + nn.Dense(cfg.d_model, use_bias=False, name="down")(nn.silu(gate) * up)

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq_len, cfg.d_model))
            x = nn.Embed(256, cfg.d_model)(tokens) + pos[: tokens.shape[1]]
            mask = nn.make_causal_mask(tokens)
            for _ in range(cfg.layers):
                x = Block()(x, mask)
            return nn.Dense(256, use_bias=False)(nn.RMSNorm()(x))

    return LM()


def windows(data: np.ndarray, n: int, length: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """``n`` windows of ``length + 1`` bytes: random starts, or evenly spaced."""
    if rng is None:
        starts = np.linspace(0, len(data) - length - 2, n).astype(int)
    else:
        starts = rng.integers(0, len(data) - length - 1, n)
    return np.stack([data[s:s + length + 1] for s in starts])


def train(cfg: Config, data: np.ndarray, log=print):
    import jax
    import jax.numpy as jnp
    import optax

    model = make_model(cfg)
    variables = model.init(jax.random.key(cfg.seed), jnp.zeros((1, cfg.seq_len), jnp.int32))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.steps // 10, 1), cfg.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))

    def loss_fn(v, seqs):
        logits = model.apply(v, seqs[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()

    @jax.jit
    def step(v, state, seqs):
        loss, grads = jax.value_and_grad(loss_fn)(v, seqs)
        updates, state = tx.update(grads, state, v)
        return optax.apply_updates(v, updates), state, loss

    rng = np.random.default_rng(cfg.seed)
    state = tx.init(variables)
    t = time.perf_counter()
    for i in range(cfg.steps):
        variables, state, loss = step(variables, state, windows(data, cfg.batch, cfg.seq_len, rng))
        if (i + 1) % max(cfg.steps // 5, 1) == 0:
            log(f"step {i + 1:4d}  train loss {float(loss):.3f}  ({time.perf_counter() - t:.0f} s)")
    return model, variables


def perplexity(model, variables, seqs: np.ndarray) -> float:
    import jax
    import optax

    @jax.jit
    def nll(v, s):
        logits = model.apply(v, s[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, s[:, 1:]).mean()

    return float(np.exp(np.mean([float(nll(variables, seqs[i:i + 16]))
                                 for i in range(0, len(seqs), 16)])))


def trained(cfg: Config, train_data: np.ndarray, cache: Optional[str], log=print):
    """``train``, or its result loaded from ``cache`` (a directory) when a run
    with the same configuration saved it there."""
    import flax.serialization
    import jax
    import jax.numpy as jnp

    path = None
    if cache:
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("calib", "eval_seqs")}
        key = "_".join(f"{k}{v}" for k, v in sorted(fields.items()))
        path = os.path.join(cache, f"oneshot_lm_{hashlib.sha1(key.encode()).hexdigest()[:12]}.msgpack")
        if os.path.exists(path):
            model = make_model(cfg)
            like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, cfg.seq_len), jnp.int32))
            with open(path, "rb") as f:
                log(f"loaded the trained model from {path}")
                return model, flax.serialization.from_bytes(like, f.read())
    model, variables = train(cfg, train_data, log)
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path, "wb") as f:
            f.write(flax.serialization.to_bytes(variables))
    return model, variables


# (method, comparison group of unstructured masks): the papers' defaults, and each
# of magnitude and Wanda in the other's group too. N:M groups are the same for all.
METHODS = (("magnitude", "layer"), ("magnitude", "row"), ("wanda", "row"), ("wanda", "layer"),
           ("sparsegpt", None))
SPARSITIES = (0.5, "2:4")


def run(cfg: Config, methods=METHODS, sparsities=SPARSITIES, log=print,
        cache: Optional[str] = None) -> dict:
    """Trains (or loads from ``cache``), prunes and evaluates; returns
    {"dense": ppl, (method, comparison, sparsity): ppl}."""
    import jaxprune

    train_data, val_data = corpus(cfg.corpus_bytes)
    log(f"corpus: {len(train_data):,} train / {len(val_data):,} validation bytes of stdlib source")
    model, variables = trained(cfg, train_data, cache, log)
    val = windows(val_data, cfg.eval_seqs, cfg.seq_len, None)
    calib = windows(train_data, cfg.calib, cfg.seq_len, np.random.default_rng(cfg.seed + 1))[:, :-1]
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    results = {"dense": perplexity(model, variables, val)}
    log(f"dense perplexity {results['dense']:.3f}")
    for sparsity in sparsities:
        for method, comparison in methods:
            if isinstance(sparsity, str) and comparison not in (None, DEFAULT[method]):
                continue  # N:M: the comparison group is each group of m inputs
            t = time.perf_counter()
            pruned, masks = jaxprune.oneshot(model.apply, variables, batches, method=method,
                                             sparsity=sparsity, where=WHERE, comparison=comparison)
            ppl = results[(method, comparison, sparsity)] = perplexity(model, pruned, val)
            log(f"{method:>9} {comparison or '':>5} {str(sparsity):>4}: perplexity {ppl:.3f}  "
                f"(sparsity {float(jaxprune.sparsity(masks)):.3f}, {time.perf_counter() - t:.1f} s)")
    return results


DEFAULT = {"magnitude": "layer", "wanda": "row", "sparsegpt": None}


def table(results: dict, methods=METHODS, sparsities=SPARSITIES) -> str:
    names = [f"{m} (per {c})" if c else m for m, c in methods]
    lines = ["| sparsity | dense | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(methods)]
    for s in sparsities:
        cells = [f"{results[(m, c, s)]:.3f}" if (m, c, s) in results else "=" for m, c in methods]
        label = "50% unstructured" if s == 0.5 else str(s)
        lines.append(f"| {label} | {results['dense']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 2:4 with each method's default only (or JAXPRUNE_SMOKE=1)")
    ap.add_argument("--steps", type=int, help="training steps")
    ap.add_argument("--layers", type=int, help="transformer blocks")
    ap.add_argument("--d-model", type=int, help="width")
    ap.add_argument("--calib", type=int, help="calibration sequences")
    ap.add_argument("--seed", type=int, help="random seed")
    ap.add_argument("--cache", help="directory to save the trained model in and reuse it from")
    args = ap.parse_args()
    smoke = args.smoke or os.environ.get("JAXPRUNE_SMOKE") == "1"
    cfg = dataclasses.replace(SMOKE if smoke else Config())
    for name in ("steps", "layers", "d_model", "calib", "seed"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    t = time.perf_counter()
    methods = tuple((m, c) for m, c in METHODS if c == DEFAULT[m]) if smoke else METHODS
    sparsities = ("2:4",) if smoke else SPARSITIES
    results = run(cfg, methods, sparsities, cache=args.cache)
    print(table(results, methods, sparsities))
    print(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
