"""Test setup: 8 simulated CPU devices (set before JAX initialises its backend)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8) if hasattr(jax.config, "jax_num_cpu_devices") else None

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("default", deadline=None, max_examples=15,
                                     print_blob=True)
hypothesis.settings.load_profile("default")

import pytest  # noqa: E402

from jaxprune import leaf_groups  # noqa: E402


@pytest.fixture(autouse=True)
def _one_device_grouping(request, monkeypatch):
    """A user with one device gets leaves grouped by size and stacked
    flattened (``jaxprune.leaf_groups``); this suite simulates 8 devices, so
    every test but the sharding ones is run that way. ``test_sharding``
    keeps the multi-device grouping by shape, whose no-gather property it
    checks."""
    if not request.module.__name__.endswith("test_sharding"):
        monkeypatch.setattr(leaf_groups, "_FLATTEN", True)
