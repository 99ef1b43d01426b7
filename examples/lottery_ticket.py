"""Lottery tickets: iterative magnitude pruning with rewinding, against a random
re-initialisation of the same masks.

IMP (Frankle & Carbin 2019) with step-k rewinding (Frankle et al. 2020): train
k steps, snapshot, then repeat {train, prune a fraction of the remaining
weights by magnitude, rewind the survivors to the snapshot}. The ticket of
every round is retrained and compared with the same masks on a fresh random
initialisation: the ticket should stay near the dense accuracy further into
high sparsity than the random re-init does.

    python examples/lottery_ticket.py [--rounds 5] [--fraction 0.4] [--steps 300]
"""

from __future__ import annotations

import time

import optax
from tqdm.auto import tqdm

import jaxprune
from jaxprune import lottery

import common


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.4, help="pruned per round, of what remains")
    p.add_argument("--steps", type=int, default=300, help="training steps per round")
    p.add_argument("--rewind", type=int, default=50, help="rewind to the weights of this step")
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--out", default="lottery_out", help="directory for the plot")
    args = common.parse_args(p, argv, smoke=dict(rounds=2, steps=3, rewind=2, hidden=[16],
                                                 limit=256))
    start = time.perf_counter()
    data = common.flat(common.images(args.data, args.limit))
    sizes = [data[0][0].shape[1], *args.hidden, 10]
    init = common.mlp_init(common.key(0), sizes)
    early, _ = common.train_mlp(init, optax.adam(1e-3), data, args.rewind, chunk=args.rewind,
                                desc=f"{args.rewind} steps to the rewind point")
    early = lottery.snapshot(early)
    train = common.fixed_mask_trainer(data, args.steps)

    bar = tqdm(total=args.rounds + 1, desc="IMP rounds (train, prune, rewind)", unit="round")

    def train_fn(params, masks):
        out = train(params, masks)
        bar.update(1)
        return out

    rounds = lottery.imp(train_fn, early, rounds=args.rounds, fraction=args.fraction)
    final = train_fn(rounds[-1].ticket, rounds[-1].masks)
    bar.close()

    # Round r trains the ticket of round r-1; the last ticket is trained above.
    trained = [r.trained for r in rounds] + [final]
    masks = [lottery.dense_masks(early)] + [r.masks for r in rounds]
    reinit = common.mlp_init(common.key(1), sizes)  # same shapes, new random weights
    rows, curve = [], []
    for level, (params, m) in enumerate(tqdm(list(zip(trained, masks)), desc="random re-init",
                                             unit="model")):
        sparsity = float(common.sparsity(m))
        ticket_acc = common.mlp_accuracy(params, data)
        random_acc = common.mlp_accuracy(train(jaxprune.apply_masks(reinit, m), m), data)
        curve.append((sparsity, ticket_acc, random_acc))
        rows.append([level, f"{sparsity:.3f}", f"{ticket_acc:.4f}", f"{random_acc:.4f}",
                     f"{ticket_acc - random_acc:+.4f}"])
    print(f"\nIMP with rewinding to step {args.rewind}, {args.fraction:.0%} of the remaining "
          f"weights pruned per round, {args.steps} training steps each (round 0 = dense):")
    print(common.table(["round", "sparsity", "ticket acc", "random re-init acc", "difference"],
                       rows))

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    s, t, r = zip(*curve)
    ax.plot(s, t, marker="o", label="lottery ticket (rewound)")
    ax.plot(s, r, marker="s", label="same masks, random re-init")
    ax.set(xlabel="sparsity", ylabel="test accuracy", title="iterative magnitude pruning")
    ax.legend()
    print(f"figure: {common.save_figure(fig, args.out, 'lottery_ticket.png')}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
