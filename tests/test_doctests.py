"""Runs the examples in public docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import jaxprune

MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxprune.__path__, "jaxprune."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
