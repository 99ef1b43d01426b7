"""2:4 sparsity from a dense checkpoint, fine-tuned with a straight-through
estimator (STE).

N:M sparsity keeps exactly n weights in every group of m consecutive weights
along the reduction axis: the pattern sparse tensor cores run at up to twice
the dense speed (2:4, Mishra et al. 2021). Starting from a trained dense MLP
restored from an orbax checkpoint, this compares

  one-shot 2:4       magnitude 2:4 masks, no training;
  2:4 + masked FT    the same masks, fixed, with the pruned weights held at 0;
  2:4 + STE FT       dense weights keep training, the forward uses the 2:4
                     masked weights recomputed every step, gradients pass
                     straight through (Zhou et al. 2021, "Learning N:M
                     Fine-grained Structured Sparse Neural Networks From Scratch"),

and checks that every group of 4 along the reduction axis keeps exactly 2.

    python examples/n_of_m.py [--steps 600] [--finetune 300]
"""

from __future__ import annotations

import shutil
import tempfile
import time

import jax
import numpy as np
import optax

import jaxprune
from jaxprune import checkpoint

import common

N, M, AXIS = 2, 4, 0  # kernels are (in, out): axis 0 is the reduction axis


def is_n_of_m(masks) -> bool:
    """Every group of M consecutive entries along AXIS keeps exactly N."""
    for m in jax.tree.leaves(masks):
        m = np.moveaxis(np.asarray(m), AXIS, -1)
        groups = m.reshape(*m.shape[:-1], m.shape[-1] // M, M)
        if not (groups.sum(-1) == N).all():
            return False
    return True


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=600, help="dense training steps")
    p.add_argument("--finetune", type=int, default=300)
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    args = common.parse_args(p, argv, smoke=dict(steps=4, finetune=4, hidden=[16], limit=256))
    start = time.perf_counter()
    data = common.flat(common.images(args.data, args.limit))
    sizes = [data[0][0].shape[1], *args.hidden, 10]
    trained, _ = common.train_mlp(common.mlp_init(common.key(0), sizes), optax.adam(1e-3),
                                  data, args.steps, desc="dense")
    root = tempfile.mkdtemp(prefix="jaxprune_n_of_m_")
    try:
        with checkpoint.manager(root) as mngr:
            checkpoint.save(mngr, args.steps, trained)
        with checkpoint.manager(root) as mngr:  # "later": start from the dense checkpoint
            dense = checkpoint.restore(mngr, jax.eval_shape(lambda: trained))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    scores = jaxprune.scores.magnitude(dense)
    masks = jaxprune.masks.n_of_m(scores, n=N, m=M, axis=AXIS)
    one_shot = jaxprune.apply_masks(dense, masks)
    chunk = max(args.finetune // 5, 1)
    masked_ft, _ = common.train_mlp(one_shot, jaxprune.fixed_masks(optax.adam(1e-3), masks), data,
                                    args.finetune, chunk=chunk, desc="2:4 + masked fine-tune")

    ste = optax.chain(optax.adam(1e-3),
                      jaxprune.ste(jaxprune.scores.magnitude, 0.5, granularity="n_of_m",
                                   n=N, m=M, axis=AXIS))
    forward = lambda params, state: jaxprune.ste_apply(params, jaxprune.masks_of(state))
    ste_params, ste_state = common.train_mlp(dense, ste, data, args.finetune, chunk=chunk,
                                             desc="2:4 + STE fine-tune", forward=forward)
    ste_masks = jaxprune.masks_of(ste_state)
    ste_final = jaxprune.apply_masks(ste_params, ste_masks)  # what gets deployed
    changed = sum(int((np.asarray(a) != np.asarray(b)).sum())
                  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(ste_masks)))

    rows = [["dense (restored checkpoint)", f"{common.mlp_accuracy(dense, data):.4f}", "0.000",
             "-"]]
    for name, params, m in [("one-shot 2:4", one_shot, masks),
                            ("2:4 + masked fine-tune", masked_ft, masks),
                            ("2:4 + STE fine-tune", ste_final, ste_masks)]:
        rows.append([name, f"{common.mlp_accuracy(params, data):.4f}",
                     f"{float(jaxprune.sparsity(m)):.3f}", "yes" if is_n_of_m(m) else "NO"])
    print(f"\n{N}:{M} along axis {AXIS} of every kernel, fine-tunes of {args.finetune} steps:")
    print(common.table(["model", "test acc", "sparsity", f"exactly {N} of every {M}"], rows))
    print(f"STE moved {changed:,} mask entries away from the one-shot 2:4 masks while training")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
