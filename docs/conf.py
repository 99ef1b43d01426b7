"""Sphinx configuration of the jaxprune documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference (``docs/api/``) is generated from ``__all__`` at every
build by ``docs/apigen.py``; warnings are errors, so a broken docstring fails.
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS)]  # the checkout's jaxprune, then apigen
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import apigen  # noqa: E402
import jaxprune  # noqa: E402
from docutils import nodes  # noqa: E402
from sphinx import addnodes  # noqa: E402
from sphinx.util import logging  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

logger = logging.getLogger(__name__)

project = "jaxprune"
author = "the jaxprune authors"
copyright = "the jaxprune authors"
release = version = jaxprune.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" sections
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True     # `score=scores.magnitude`, not `<function ...>`
autosummary_generate = False         # apigen writes the pages
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True             # "Attributes:" as fields, not a second copy of each member
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jaxprune {release}"


def _generate_api(app):
    apigen.write(DOCS / "api")


class CitedBy(SphinxDirective):
    """``{cited-by} Surname year``: links to every public name and module whose
    docstring cites that paper; a paper that nothing cites is a warning (an
    error under ``-W``), so the references page lists only what is implemented."""

    required_arguments = 1
    final_argument_whitespace = True

    def run(self):
        surname, year = self.arguments[0].rsplit(" ", 1)
        names = apigen.cited_by(surname, year)
        if not names:
            logger.warning(f"no public docstring cites {surname} {year}",
                           location=(self.env.docname, self.lineno))
            return []
        para = nodes.paragraph("", "In jaxprune: ")
        for i, name in enumerate(names):
            if i:
                para += nodes.Text(", ")
            ref = addnodes.pending_xref("", refdomain="py", reftype="obj", reftarget=name,
                                        refexplicit=False, refwarn=True,
                                        refdoc=self.env.docname)
            ref += nodes.literal(name, name, classes=["xref", "py", "py-obj"])
            para += ref
        return [para]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields carry a generated "Alias for field number N"; the
    # class docstring's "Attributes:" section documents them instead.
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("builder-inited", _generate_api)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.add_directive("cited-by", CitedBy)
