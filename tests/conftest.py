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
