"""Warnings about suspicious input, raised eagerly or from inside ``jit``.

Some mistakes can only be seen in the values (negative scores passed where
magnitudes were meant, a layer about to be emptied, NaN weights that a mask
cannot zero). jaxprune reports them as ``PruningWarning``: at once when the
values are concrete, and through one ``jax.debug.callback`` per check site
when they are traced, so that the check runs where the values already are
(inside the mask-update ``lax.cond`` of the optax transformations, never on
ordinary training steps). Silence them with the standard ``warnings``
filters, e.g. ``warnings.simplefilter("ignore", jaxprune.PruningWarning)``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import jax
import numpy as np

__all__ = ["PruningWarning", "Reporter", "warn"]


class PruningWarning(UserWarning):
    """Something jaxprune computed is probably not what the caller meant."""


def warn(message: str, seen: Optional[set] = None) -> None:
    """Issues ``message`` as a ``PruningWarning`` (once per ``seen`` set)."""
    if seen is not None:
        if message in seen:
            return
        seen.add(message)
    warnings.warn(message, PruningWarning, stacklevel=3)


# A check: flags (an array, any shape) and a function from the concrete
# flags to a message, or None when there is nothing to say.
Check = tuple[jax.Array, Callable[[np.ndarray], Optional[str]]]


class Reporter:
    """Turns checks into warnings; with ``once=True`` each distinct message
    is issued once per reporter (one per optax transformation).
    ``sparsity_valid`` says the caller already refused sparsities outside
    [0, 1], so the mask functions need not check them again."""

    def __init__(self, once: bool = False, sparsity_valid: bool = False):
        self.seen: Optional[set] = set() if once else None
        self.sparsity_valid = sparsity_valid

    def report(self, checks: Sequence[Check]) -> None:
        """Warns for each check whose message is not None: now if every flag
        is concrete, else from one ``jax.debug.callback`` at run time."""
        checks = [c for c in checks if c is not None]
        if not checks:
            return
        flags = [f for f, _ in checks]
        formatters = [fmt for _, fmt in checks]
        if not any(isinstance(f, jax.core.Tracer) for f in flags):
            self._emit(formatters, *[np.asarray(f) for f in flags])
            return
        jax.debug.callback(lambda *fs: self._emit(formatters, *fs), *flags)

    def _emit(self, formatters, *flags) -> None:
        for fmt, f in zip(formatters, flags):
            message = fmt(np.asarray(f))
            if message is not None:
                warn(message, self.seen)


def leaves_flagged(paths: Sequence[str], flags: np.ndarray, limit: int = 6) -> str:
    """``'a', 'b' and 3 more``: the paths whose flag is set."""
    # Under vmap the flags gain leading batch axes: a leaf counts if any has it.
    flags = np.asarray(flags).reshape(-1, len(paths)).any(axis=0)
    hit = [p for p, f in zip(paths, flags) if f]
    shown = ", ".join(f"'{p}'" for p in hit[:limit])
    return shown + (f" and {len(hit) - limit} more" if len(hit) > limit else "")
