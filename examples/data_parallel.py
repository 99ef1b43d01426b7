"""Data-parallel pruning: parameters replicated, every batch sharded over all
local devices (1 CPU, 8 simulated CPU devices, a GPU or the 8 cores of a TPU).

Nothing in jaxprune changes: under ``jit`` the gradients are already global
means, so every device computes the same global-threshold masks. The run is
repeated on one device with the same batches, and the two are compared
(parameters to float tolerance, masks entry by entry).

    python examples/data_parallel.py                # every local device
    python examples/data_parallel.py --devices 8    # on a CPU: simulate 8 devices
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxprune

import common


def make_run(tx, x, y, batch_sharding):
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run(state, idx):
        def step(carry, batch):
            params, aux, opt_state = carry
            xb, yb = xs[batch], ys[batch]
            if batch_sharding is not None:  # split the batch over the devices
                xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
                yb = jax.lax.with_sharding_constraint(yb, batch_sharding)
            grads = jax.grad(lambda p: common.mlp_loss(p, None, xb, yb)[0])(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), aux, opt_state), None
        return jax.lax.scan(step, state, idx)[0]

    return run


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--devices", type=int, default=None,
                   help="on a CPU, simulate this many devices (before JAX starts)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--per-device-batch", type=int, default=32)
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    args = common.parse_args(p, argv, smoke=dict(steps=4, hidden=[16], limit=256,
                                                 per_device_batch=4))
    if args.devices:
        try:
            jax.config.update("jax_num_cpu_devices", args.devices)
        except Exception as e:  # the backend is already running (e.g. inside a notebook)
            print(f"note: cannot change the device count now ({e}); using {jax.device_count()}")
    start = time.perf_counter()
    devices = jax.local_devices()
    n = len(devices)
    # Auto axes: jit places the computation; the batch is split by a sharding constraint.
    mesh = jax.make_mesh((n,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    print(f"{n} device(s): {devices[0].platform}; global batch {args.per_device_batch * n}")

    data = common.flat(common.images(args.data, args.limit))
    (x, y), _ = data
    sizes = [x.shape[1], *args.hidden, 10]
    init = common.mlp_init(common.key(0), sizes)
    schedule = jaxprune.schedules.polynomial(0.9, begin=0, end=max(args.steps * 3 // 4, 1),
                                             every=max(args.steps // 20, 1))
    tx = optax.chain(optax.adam(1e-3), jaxprune.prune(jaxprune.scores.magnitude, schedule,
                                                      scope="global"))
    chunk = max(args.steps // 10, 1)
    runs = {}
    for name, put, sharding in [("sharded", replicated, batch_sharding),
                                ("one device", devices[0], None)]:
        params = jax.device_put(init, put)
        state = (params, None, jax.device_put(tx.init(params), put))
        run = make_run(tx, x, y, sharding)
        t0 = time.perf_counter()
        params, _, opt_state = common.train(
            run, state, args.steps, batch_size=args.per_device_batch * n,
            n_train=len(x), chunk=chunk, seed=0, desc=name)
        jax.block_until_ready(params)
        runs[name] = (params, jaxprune.masks_of(opt_state), time.perf_counter() - t0)
        if sharding is not None:  # the compiled step all-reduces gradients over the devices
            idx = np.zeros((chunk, args.per_device_batch * n), int)
            hlo = run.lower(state, idx).compile().as_text()
            print(f"compiled step: {hlo.count('all-reduce')} all-reduce(s) across {n} devices"
                  if n > 1 else "one device: no collectives needed")

    (p_sh, m_sh, t_sh), (p_one, m_one, t_one) = runs["sharded"], runs["one device"]
    kernel = p_sh["Dense_0"]["kernel"]
    print(f"\nparams live on {len(kernel.sharding.device_set)} device(s), "
          f"{'replicated' if kernel.sharding.is_fully_replicated else kernel.sharding}; "
          f"masks too: {m_sh['Dense_0']['kernel'].sharding.is_fully_replicated}")
    diff = max(float(jnp.abs(a - jax.device_put(b, a.sharding)).max())
               for a, b in zip(jax.tree.leaves(p_sh), jax.tree.leaves(p_one)))
    differ = sum(int((np.asarray(a) != np.asarray(b)).sum())
                 for a, b in zip(jax.tree.leaves(m_sh), jax.tree.leaves(m_one)))
    total = sum(np.size(m) for m in jax.tree.leaves(m_sh))
    rows = [[name, f"{float(jaxprune.sparsity(m)):.4f}",
             f"{common.mlp_accuracy(jax.device_get(prm), data):.4f}", f"{t:.1f} s"]
            for name, (prm, m, t) in runs.items()]
    print(common.table(["run", "sparsity", "test acc", f"{args.steps} steps (incl. compile)"],
                       rows))
    print(f"max |param difference| {diff:.2e} (float summation order); mask entries that "
          f"differ: {differ} of {total:,}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
