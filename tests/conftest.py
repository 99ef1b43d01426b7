"""Test setup: 8 simulated CPU devices and fast compiles (set before JAX
initialises its backend)."""

import os

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The suite is compile-bound: most tests jit small programs once, and XLA:CPU
# spends most of each compile in LLVM's optimisation passes. Level 0 skips
# those (XLA's own HLO passes, fusion included, still run): the whole suite
# takes a third to two fifths less time. Every comparison a test makes is
# between programs compiled at one level (LLVM's levels may round floats
# differently, so a subprocess must inherit these flags, as the fresh-process
# resume test does); JAXPRUNE_TEST_XLA_OPT=default runs the suite at XLA's
# default level, which is what users' programs get. Subprocesses (README
# blocks, examples, notebooks) inherit the flag.
if (os.environ.get("JAXPRUNE_TEST_XLA_OPT") != "default"
        and "--xla_backend_optimization_level" not in _flags):
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
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


# Scheduling only (a wrong number costs time, never a result). xdist (--dist loadfile) hands out
# whole files in collection order (--no-loadscope-reorder in addopts); this puts the files that
# take longest first, so that no long file starts last and keeps one core busy alone at the end
# (by default xdist orders files by their number of tests, which put the one-test benchmarks
# smoke run, minutes long, last). Rough seconds of a test on one loaded core: a slow or examples
# test 20, others 2, and the long ones below (measured with --durations, at LLVM level 0).
SECONDS = {
    "test_quick_run_writes_every_section_header_field_and_plot": 120,
    "test_example_runs_with_tiny_settings_and_prints_its_evidence": 40,
    "test_notebooks_run_top_to_bottom_in_real_kernels": 70,
    "test_transformations_give_the_masks_of_the_shape_grouping": 30,
    "test_layer_axis_and_kept_masks_give_the_masks_of_the_shape_grouping": 20,
    "test_doc_page_snippets_run_in_order": 15,
    "test_readme_block_runs_alone_in_a_fresh_interpreter": 15,
    "test_linen_zoo_train_mode_shrinks_to_the_masked_model": 40,
    "test_language_model_perplexity_ordering": 30,
    "test_same_training_under_jit_pmap_and_sharded_batch": 35,
    "test_masked_semantics_is_the_zero_removed_model_for_every_spelling": 25,
    "test_cnn_batchnorm_residual_linen_shrunk_equals_masked": 20,
    "test_fused_magnitude_scores_give_the_masks_of_materialised_scores": 20,
    "test_transformer_block_linen_prunes_whole_heads_and_mlp": 20,
    "test_eager_jit_prune_pruned_sparse_training_lottery_and_structured_count_alike": 20,
    "test_guard_over_stacks_of_equal_leaves_matches_the_reference": 20,
    "test_stacked_mask_update_equals_the_per_leaf_update": 15,
}


@pytest.hookimpl(trylast=True)  # after -m has deselected: only the tests that run count
def pytest_collection_modifyitems(config, items):
    def seconds(item):
        slow = item.get_closest_marker("slow") or item.get_closest_marker("examples")
        return SECONDS.get(getattr(item, "originalname", item.name), 20 if slow else 2)

    cost = {}
    for item in items:
        cost[item.nodeid.split("::")[0]] = cost.get(item.nodeid.split("::")[0], 0) + seconds(item)
    items.sort(key=lambda item: -cost[item.nodeid.split("::")[0]])  # stable: a file keeps its order
