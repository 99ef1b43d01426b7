"""Warnings about suspicious input and what jaxprune did about it.

Some mistakes can only be seen in the values (negative scores passed where
magnitudes were meant, a layer about to be emptied, NaN weights that a mask
cannot zero, pruned weights that another transformation moved). jaxprune
reports them as ``PruningWarning``:

* the pure mask functions warn at once when the values are concrete, and
  through ``jax.debug.callback`` when they are traced under a user's ``jit``;
* the optax transformations never put a host callback in the training step
  (one would take JAX's C++ dispatch path away from EVERY step: measured
  2.8 -> 6.8 ms per step on the 0.3M-parameter benchmark model). They record
  per-leaf flags in ``PruneState.alerts``, computed inside the mask-update
  ``lax.cond`` where the params are read anyway, and ``check(opt_state)``
  turns them into warnings (``jaxprune.masks_of`` and ``sparsity_of`` call
  it).

Silence them with the standard filters, e.g.
``warnings.simplefilter("ignore", jaxprune.PruningWarning)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PruningWarning", "Alerts", "Reporter", "warn", "check"]


class PruningWarning(UserWarning):
    """Something jaxprune computed is probably not what the caller meant."""


def warn(message: str, seen: Optional[set] = None) -> None:
    """Issues ``message`` as a ``PruningWarning`` (once per ``seen`` set)."""
    if seen is not None:
        if message in seen:
            return
        seen.add(message)
    warnings.warn(message, PruningWarning, stacklevel=3)


def leaves_flagged(paths: Sequence[str], flags: np.ndarray, limit: int = 6) -> str:
    """``'a', 'b' and 3 more``: the paths whose flag is set."""
    # Under vmap the flags gain leading batch axes: a leaf counts if any has it.
    flags = np.asarray(flags).reshape(-1, len(paths)).any(axis=0)
    hit = [p for p, f in zip(paths, flags) if f]
    shown = ", ".join(f"'{p}'" for p in hit[:limit])
    return shown + (f" and {len(hit) - limit} more" if len(hit) > limit else "")


# --- the messages (shared by the eager warnings and check(opt_state)) ---------

def collapse_message(leaves: str, short: bool) -> str:
    return (f"scope='global' would empty or nearly empty {leaves} (layer collapse): the default "
            "guard keeps in every leaf at least a tenth of its uniform share"
            + (", pruning fewer entries than asked, since the floors exceed what the sparsity "
               "keeps" if short else "; the total count is unchanged")
            + ". Pass min_density=0.0 to allow it, or min_density=d to set the floor")


def negative_message(leaves: str) -> str:
    return (f"scores of {leaves} contain negative values, but masks keep the HIGHEST scores: raw "
            "weights as scores prune large negative weights first. Pass "
            "jaxprune.scores.magnitude(params), or signed=True if the scores are signed on "
            "purpose (e.g. movement pruning)")


def nonfinite_message(leaves: str) -> str:
    return (f"non-finite weights (NaN/inf) at pruned positions of {leaves}: p + (-p) is NaN "
            "there, so no update can zero them and they stay NaN. Zero them once with "
            "params = jaxprune.apply_masks(params, jaxprune.masks_of(opt_state)); NaN weights "
            "come from a diverged step (lower the learning rate, clip gradients)")


def nonzero_message(leaves: str, who: str) -> str:
    return (f"pruned weights of {leaves} were not zero on the step after a mask update: a "
            f"transformation after {who} changed its updates, or the params were changed "
            f"outside the optimizer. {who} must be LAST in the chain, e.g. "
            f"optax.chain(optax.adam(1e-3), {who}(...)); or wrap the optimizer, "
            "jaxprune.pruned(optax.adam(1e-3), ...)")


def refused_message(count: int, who: str) -> str:
    return (f"{who} refused {count} mask update(s): the requested sparsity was outside [0, 1] "
            "or NaN, so the masks were kept as they were (PruneState.refused counts them)")


# --- checks: eager warnings, callbacks under jit, or flags to collect --------

# A check: a kind, flags (an array), and a function from the concrete flags to
# a message, or None when there is nothing to say.
Check = tuple[str, jax.Array, Callable[[np.ndarray], Optional[str]]]


class Reporter:
    """Turns checks into warnings.

    ``once=True``: each distinct message is issued once per reporter.
    ``collect=True``: nothing is issued; the flags are kept in ``found``
    (kind -> flags, OR-ed) for the caller to return (the optax
    transformations store them in their state). ``sparsity_valid``: the
    caller already refused sparsities outside [0, 1].
    """

    def __init__(self, once: bool = False, collect: bool = False, sparsity_valid: bool = False):
        self.seen: Optional[set] = set() if once else None
        self.collect = collect
        self.sparsity_valid = sparsity_valid
        self.found: dict[str, jax.Array] = {}

    def report(self, checks: Sequence[Optional[Check]]) -> None:
        """Warns for each check whose message is not None: now if every flag
        is concrete, else from one ``jax.debug.callback`` at run time."""
        checks = [c for c in checks if c is not None]
        if self.collect:
            for kind, flags, _ in checks:
                self.found[kind] = flags if kind not in self.found else self.found[kind] | flags
            return
        if not checks:
            return
        flags = [f for _, f, _ in checks]
        formatters = [fmt for _, _, fmt in checks]
        if not any(isinstance(f, jax.core.Tracer) for f in flags):
            self._emit(formatters, *[np.asarray(f) for f in flags])
            return
        jax.debug.callback(lambda *fs: self._emit(formatters, *fs), *flags)

    def _emit(self, formatters, *flags) -> None:
        for fmt, f in zip(formatters, flags):
            message = fmt(np.asarray(f))
            if message is not None:
                warn(message, self.seen)


# --- alerts recorded by the optax transformations -----------------------------

class Alerts(NamedTuple):
    """Per masked leaf (in mask-tree order), set once seen and kept:
    ``nonfinite`` weights at pruned positions, pruned weights found
    ``nonzero`` on the step after a mask update (the chain order),
    ``collapse`` (held at its floor by the global-scope guard) and
    ``negative`` scores; ``short``: the guard's floors exceeded what the
    sparsity keeps, so fewer entries were pruned than asked."""

    nonfinite: jax.Array
    nonzero: jax.Array
    collapse: jax.Array
    negative: jax.Array
    short: jax.Array

    @classmethod
    def none(cls, n_leaves: int) -> "Alerts":
        # Separate arrays: a donated state must not hold one buffer twice.
        return cls(*(jnp.zeros(n_leaves, bool) for _ in range(4)), jnp.zeros((), bool))

    def merge(self, other: "Alerts") -> "Alerts":
        return Alerts(*(a | b for a, b in zip(self, other)))


def alert_messages(state: Any, who: str) -> list[str]:
    """The messages for the alerts of one ``PruneState`` (host side)."""
    alerts = getattr(state, "alerts", None)
    out = []
    refused = getattr(state, "refused", None)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((alerts, refused))):
        return out  # inside a trace: nothing to read yet
    # Replicated states (pmap) carry a leading device axis: the worst device counts.
    refused = None if refused is None else int(np.max(np.asarray(refused), initial=0))
    if refused:
        out.append(refused_message(refused, who))
    if alerts is None:
        return out
    from jaxprune.tree import leaves_with_paths
    paths = [p for p, m in leaves_with_paths(state.masks, keep_none=True) if m is not None]
    flags = {k: np.asarray(v) for k, v in alerts._asdict().items()}
    if not paths or flags["nonfinite"].shape[-1:] != (len(paths),):
        return out
    if flags["collapse"].any():
        out.append(collapse_message(leaves_flagged(paths, flags["collapse"]),
                                    bool(flags["short"].any())))
    if flags["negative"].any():
        out.append(negative_message(leaves_flagged(paths, flags["negative"])))
    if flags["nonfinite"].any():
        out.append(nonfinite_message(leaves_flagged(paths, flags["nonfinite"])))
    if flags["nonzero"].any():
        out.append(nonzero_message(leaves_flagged(paths, flags["nonzero"]), who))
    return out


def check(opt_state: Any) -> list[str]:
    """Issues a ``PruningWarning`` for every alert recorded by the jaxprune
    transformations anywhere in ``opt_state`` and returns the messages.

    Call it when you log (it reads a few flags from the device); it is also
    called by ``jaxprune.masks_of`` and ``jaxprune.sparsity_of``.

    >>> import jax.numpy as jnp, optax, jaxprune
    >>> tx = optax.chain(jaxprune.prune(sparsity=0.5), optax.sgd(0.1))  # wrong order
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...     updates, state = tx.update(params, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     print(check(state)[0][:60])
    pruned weights of 'w' were not zero on the step after a mask
    """
    from jaxprune.transform import PrunedState, PruneState
    messages = []
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, (PruneState, PrunedState)))
    for node in found:
        if isinstance(node, PrunedState):
            messages.extend(alert_messages(node.prune_state, "jaxprune.pruned"))
        elif isinstance(node, PruneState):
            messages.extend(alert_messages(node, "jaxprune.prune"))
    for m in messages:
        warn(m)
    return messages
