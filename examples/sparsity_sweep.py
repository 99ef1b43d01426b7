"""How much can be pruned, and how to spread it: a sweep from 50% to 98%.

LeNet-300-100 (LeCun et al. 1998; the MLP of Han et al. 2015) is trained dense
on MNIST, then pruned one-shot by magnitude at each sparsity with four
allocations, and each pruned model gets the same short fine-tune:

  local         every layer loses the same fraction;
  global        one threshold over all layers (Han et al. 2015);
  ERK           per-layer sparsity by Erdos-Renyi-Kernel (Evci et al. 2020);
  global+LAMP   one threshold over layer-adaptive scores (Lee et al. 2021).

It prints accuracy before and after the fine-tune next to the dense baseline
and saves an accuracy-vs-sparsity plot.

    python examples/sparsity_sweep.py [--steps 600] [--finetune 100] [--out sweep_out]
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxprune

import common

METHODS = {
    "local": dict(scope="local"),
    "global": dict(scope="global"),
    "ERK": dict(scope="local", distribution="erk"),
    "global+LAMP": dict(scope="global", normalize="lamp"),
}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=600, help="dense training steps")
    p.add_argument("--finetune", type=int, default=100, help="fine-tune steps per pruned model")
    p.add_argument("--sparsities", type=float, nargs="+",
                   default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--out", default="sweep_out", help="directory for the plot")
    args = common.parse_args(p, argv, smoke=dict(steps=4, finetune=2, sparsities=[0.5, 0.9],
                                                 hidden=[16], limit=256))
    start = time.perf_counter()
    data = common.flat(common.images(args.data, args.limit))
    sizes = [data[0][0].shape[1], *args.hidden, 10]
    params = common.mlp_init(common.key(0), sizes)
    dense, _ = common.train_mlp(params, optax.adam(1e-3), data, args.steps, desc="dense")
    dense_acc = common.mlp_accuracy(dense, data)
    print(f"dense MLP {sizes}: test accuracy {dense_acc:.4f}")

    finetune = common.fixed_mask_trainer(data, args.finetune, 128)
    scores = jaxprune.scores.magnitude(dense)
    results = {m: [] for m in METHODS}
    runs = [(m, s) for m in METHODS for s in args.sparsities]
    for method, s in tqdm(runs, desc="prune + fine-tune", unit="model"):
        masks = jaxprune.masks.unstructured(scores, s, **METHODS[method])
        pruned = jaxprune.apply_masks(dense, masks)
        tuned = finetune(pruned, masks)
        per_layer = [float(1 - np.mean(np.asarray(m))) for m in jax.tree.leaves(masks)]
        results[method].append((s, common.mlp_accuracy(pruned, data),
                                common.mlp_accuracy(tuned, data), per_layer))

    print(f"\ntest accuracy: one-shot -> after {args.finetune} fine-tune steps "
          f"(dense baseline {dense_acc:.4f})")
    header = ["sparsity"] + list(METHODS)
    rows = [[f"{s:.0%}"] + [f"{results[m][i][1]:.3f} -> {results[m][i][2]:.3f}" for m in METHODS]
            for i, s in enumerate(args.sparsities)]
    print(common.table(header, rows))
    top = args.sparsities[-1]
    print(f"\nper-layer sparsity at {top:.0%} (layers {', '.join(k for k in dense)}):")
    for m in METHODS:
        print(f"  {m:12s} " + "  ".join(f"{v:.3f}" for v in results[m][-1][3]))

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in METHODS:
        ax.plot([r[0] for r in results[m]], [r[2] for r in results[m]], marker="o", label=m)
    ax.axhline(dense_acc, color="gray", ls=":", label="dense")
    ax.set(xlabel="sparsity", ylabel=f"test accuracy after {args.finetune} fine-tune steps",
           title="one-shot magnitude pruning + fine-tune")
    ax.legend()
    print(f"figure: {common.save_figure(fig, args.out, 'sparsity_sweep.png')}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
