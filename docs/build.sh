#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html (or $JAXPRUNE_DOCS_OUT), warnings as
# errors (a broken docstring or a missing reference fails the build). Extra arguments go to
# sphinx (-q, -d DIR). Needs the docs extra: pip install -e ".[docs]"
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m sphinx -W --keep-going -b html docs "${JAXPRUNE_DOCS_OUT:-docs/_build/html}" "$@"
