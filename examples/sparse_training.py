"""Sparse from scratch: RigL vs SET vs static sparse vs dense, at 80% and 90%.

Every run trains LeNet-300-100 on MNIST from the same initialisation for the
same number of steps. The sparse ones keep the weight count fixed from step 0:

  static   random ERK masks, never changed (the baseline of Evci et al. 2020);
  SET      drop the smallest weights, regrow at random (Mocanu et al. 2018);
  RigL     drop the smallest weights, regrow where |gradient| is largest
           (Evci et al. 2020, "Rigging the Lottery").

It prints final accuracies next to the dense baseline, checks that the number
of active weights never changed, and saves accuracy-vs-step plots.

    python examples/sparse_training.py [--steps 400] [--sparsities 0.8 0.9]
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

import jaxprune

import common


def methods(steps: int, every: int) -> dict:
    end = max(steps * 3 // 4, 1)  # mask updates stop at 75% of training (RigL's setting)
    return {
        "static": lambda s: jaxprune.static_sparse(optax.adam(1e-3), s),
        "SET": lambda s: jaxprune.sparse_evolutionary(optax.adam(1e-3), s, every=every, end=end),
        "RigL": lambda s: jaxprune.rigl(optax.adam(1e-3), s, end=end, every=every),
    }


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=40, help="mask-update period (SET, RigL)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--out", default="sparse_training_out", help="directory for the plot")
    args = common.parse_args(p, argv, smoke=dict(steps=4, every=2, sparsities=[0.9], hidden=[16],
                                                 limit=256))
    start = time.perf_counter()
    data = common.flat(common.images(args.data, args.limit))
    sizes = [data[0][0].shape[1], *args.hidden, 10]
    init = common.mlp_init(common.key(0), sizes)
    chunk = max(args.steps // 10, 1)

    def run(name, tx):
        curve = []
        record = lambda state, done: curve.append(
            (done, common.mlp_accuracy(state[0], data))) or {"acc": f"{curve[-1][1]:.3f}"}
        params, state = common.train_mlp(init, tx, data, args.steps, chunk=chunk, desc=name,
                                         after_chunk=record)
        return params, state, curve

    dense, _, dense_curve = run("dense", optax.adam(1e-3))
    dense_acc = dense_curve[-1][1]
    curves, rows = {}, []
    for s in args.sparsities:
        for name, make in methods(args.steps, args.every).items():
            tx = make(s)
            active0 = [int(m.sum()) for m in jax.tree.leaves(jaxprune.masks_of(tx.init(init)))]
            params, state, curve = run(f"{name} {s:.0%}", tx)
            masks = jaxprune.masks_of(state)
            active = [int(m.sum()) for m in jax.tree.leaves(masks)]
            zeros_off_mask = sum(int(np.count_nonzero(np.asarray(w)[~np.asarray(m)]))
                                 for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))
                                 if m is not None and np.shape(w) == np.shape(m))
            curves[(name, s)] = curve
            rows.append([f"{name}", f"{s:.0%}", f"{curve[-1][1]:.4f}",
                         f"{curve[-1][1] - dense_acc:+.4f}", f"{sum(active):,}",
                         "yes" if active == active0 else "NO", zeros_off_mask])
    print(f"\ndense baseline: test accuracy {dense_acc:.4f} "
          f"({sum(np.size(w) for w in jax.tree.leaves(dense)):,} parameters)")
    print(common.table(["method", "sparsity", "test acc", "vs dense", "active weights",
                        "count fixed", "nonzeros off-mask"], rows))

    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(args.sparsities), figsize=(6 * len(args.sparsities), 4),
                             squeeze=False)
    for ax, s in zip(axes[0], args.sparsities):
        ax.plot(*zip(*dense_curve), color="gray", ls=":", label="dense")
        for name in methods(args.steps, args.every):
            ax.plot(*zip(*curves[(name, s)]), marker=".", label=name)
        ax.set(xlabel="step", ylabel="test accuracy", title=f"{s:.0%} sparse from scratch")
        ax.legend()
    print(f"figure: {common.save_figure(fig, args.out, 'sparse_training.png')}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
