"""The API reference, generated from ``__all__``.

Public modules are ``jaxprune`` and every module named in a public module's
``__all__``; the other modules of the package that declare ``__all__``
(``jaxprune.transform``, ``jaxprune.report``, ``jaxprune.structured.api``, ...)
follow them. Each page lists its module's ``__all__`` with signatures. An
object is documented once, under the first name it has in that order
(``jaxprune.prune``, not ``jaxprune.transform.prune``); every other page that
exports it links there. A name added to any ``__all__`` appears without
editing the docs.

``python docs/apigen.py`` prints every public name and whether it has a
docstring; ``tests/test_docs.py`` and ``docs/conf.py`` import this file.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import pathlib
import pkgutil
import re
import textwrap
from types import ModuleType
from typing import Any

PACKAGE = "jaxprune"


@dataclasses.dataclass
class Entry:
    """One name in one module's ``__all__``."""

    module: str      # the module whose ``__all__`` lists it
    name: str        # the name in that ``__all__``
    obj: Any
    canonical: str   # the full name it is documented under

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def is_canonical(self) -> bool:
        return self.full_name == self.canonical


def _module_all(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        return []
    return list(dict.fromkeys(names))


def _submodule(module: ModuleType, name: str) -> ModuleType | None:
    obj = getattr(module, name, None)  # a missing name is reported by entries()
    return obj if inspect.ismodule(obj) and obj.__name__.startswith(PACKAGE) else None


@functools.cache
def modules() -> tuple[list[str], list[str]]:
    """(public modules, other modules with ``__all__``), each in reference order."""
    root = importlib.import_module(PACKAGE)
    public, queue = [], [root]
    while queue:  # breadth first: the shortest public name comes first
        module = queue.pop(0)
        if module.__name__ in public:
            continue
        public.append(module.__name__)
        queue += [m for m in (_submodule(module, n) for n in _module_all(module)) if m]
    others = []
    for info in pkgutil.walk_packages(root.__path__, PACKAGE + "."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        if info.name not in public and hasattr(importlib.import_module(info.name), "__all__"):
            others.append(info.name)
    return public, sorted(others)


@functools.cache
def entries() -> dict[str, list[Entry]]:
    """Module name -> its ``__all__`` entries, each with its canonical name."""
    public, others = modules()
    canonical: dict[int, str] = {}
    table: dict[str, list[Entry]] = {}
    for modname in public + others:
        module = importlib.import_module(modname)
        rows = []
        for name in _module_all(module):
            if not hasattr(module, name):
                raise AttributeError(f"{modname}.__all__ names {name!r}, which {modname} lacks")
            obj = getattr(module, name)
            if _submodule(module, name):
                rows.append(Entry(modname, name, obj, obj.__name__))
                continue
            # Functions and classes are found again by identity; a constant by
            # the assignment that defines it (equal small ints and strings are
            # one object in CPython, so identity would merge unrelated ones).
            key = defining_site(modname, name) if kind(obj) == "data" else id(obj)
            rows.append(Entry(modname, name, obj, canonical.setdefault(key, f"{modname}.{name}")))
        table[modname] = rows
    return table


def kind(obj: Any) -> str:
    """The autodoc directive for ``obj``."""
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj) or inspect.isroutine(inspect.unwrap(obj)):  # jax.jit(f) too
        return "function"
    return "data"  # constants, and callable instances: documented by a ``#:`` comment


def _module_body(modname: str) -> tuple[list[ast.stmt], list[str]]:
    source = inspect.getsource(importlib.import_module(modname))
    return ast.parse(source).body, source.splitlines()


def _assigns(node: ast.stmt, name: str) -> bool:
    targets = (node.targets if isinstance(node, ast.Assign)
               else [node.target] if isinstance(node, ast.AnnAssign) else [])
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def defining_site(modname: str, name: str) -> tuple[str, str]:
    """(module, name) of the assignment behind ``modname.name``, following
    ``from jaxprune.x import name`` re-exports."""
    body, _ = _module_body(modname)
    for node in body:
        if _assigns(node, name):
            return modname, name
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name and node.module.startswith(PACKAGE):
                    return defining_site(node.module, alias.name)
    return modname, name


def data_doc(modname: str, name: str) -> str | None:
    """The ``#:`` comment before, or the string literal after, the module-level
    assignment of a constant (what Sphinx shows for it), or None."""
    modname, name = defining_site(modname, name)
    body, lines = _module_body(modname)
    for i, node in enumerate(body):
        if not _assigns(node, name):
            continue
        comment, j = [], node.lineno - 2
        while j >= 0 and lines[j].lstrip().startswith("#:"):
            comment.insert(0, lines[j].lstrip()[2:].strip())
            j -= 1
        if comment:
            return " ".join(comment)
        after = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            return after.value.value
        return None
    return None


def docstring(entry: Entry) -> str | None:
    """The documentation of an entry as Sphinx finds it (None if it has none).

    Generated docstrings do not count: a NamedTuple's or dataclass's
    ``Name(field, ...)`` and anything inherited from a base class.
    """
    obj = entry.obj
    if kind(obj) == "data":
        return data_doc(entry.module, entry.name)
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc or not doc.strip():
        return None
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return None  # namedtuple / dataclass auto-docstring
    return doc


def cited_by(surname: str, year: str) -> list[str]:
    """Public names (canonical) and modules whose docstring cites ``surname``
    and ``year`` close together ("Han et al. 2015", "Frankle & Carbin 2019")."""
    pattern = re.compile(rf"\b{re.escape(surname)}\b[^()\n]{{0,40}}?\b{year}\b")
    public, others = modules()
    objects = [e for rows in entries().values() for e in rows
               if e.is_canonical and kind(e.obj) != "module"]
    shadowed = {e.canonical for e in objects}  # e.g. the module and the function structured.groups
    found = [m for m in public + others if m not in shadowed
             and pattern.search(" ".join((importlib.import_module(m).__doc__ or "").split()))]
    found += [e.canonical for e in objects
              if pattern.search(" ".join((docstring(e) or "").split()))]
    return list(dict.fromkeys(found))


def _title(text: str, underline: str = "=") -> str:
    return f"{text}\n{underline * len(text)}\n"


def _relative(name: str, modname: str) -> str:
    """An autosummary item: relative inside the current module, else the
    full name shown by its last part."""
    return name[len(modname) + 1:] if name.startswith(modname + ".") else f"~{name}"


def _page(modname: str, rows: list[Entry], shadowed: bool) -> str:
    out = [_title(modname)]
    out.append(f".. automodule:: {modname}\n   :no-members:\n"
               + ("   :no-index:\n" if shadowed else ""))
    out.append(f".. currentmodule:: {modname}\n")
    # Constants stay out of the table: autosummary would show their type's docstring.
    listed = [e for e in rows if kind(e.obj) != "data"]
    if listed:
        out.append(".. autosummary::\n")
        out += [f"   {_relative(e.canonical, modname)}" for e in listed]
        out.append("")
    constants = [e for e in rows if kind(e.obj) == "data"]
    if constants:
        out.append("Constants: " + ", ".join(f":py:data:`{e.name} <{e.canonical}>`"
                                             for e in constants) + ".\n")
    if any(not e.is_canonical and kind(e.obj) != "module" for e in rows):
        out.append("Names re-exported from a shorter public name are documented there; "
                   "their rows above link to it.\n")
    for e in rows:
        if not e.is_canonical or kind(e.obj) == "module":
            continue
        directive = kind(e.obj)
        if directive == "data":  # the doc comment may sit in the module it is imported from
            doc = data_doc(e.module, e.name) or ""
            out.append(f".. py:data:: {e.name}\n\n{textwrap.indent(doc, '   ')}\n")
            continue
        out.append(f".. auto{directive}:: {e.name}")
        out += ["   :members:"] if directive == "class" else []
        out.append("")
    return "\n".join(out)


def _index(public: list[str], others: list[str]) -> str:
    text = textwrap.dedent("""\
        API reference
        =============

        Every name in ``jaxprune.__all__`` and in the ``__all__`` of each public
        module, with its signature and docstring (generated by ``docs/apigen.py``).
        An object is documented under its shortest public name; the other pages
        that export it link there.

        .. toctree::
           :caption: Public modules
           :maxdepth: 1

        """)
    text += "".join(f"   {m}\n" for m in public)
    text += textwrap.dedent("""
        The modules below implement the ones above; most of their names are
        re-exported there.

        .. toctree::
           :caption: Implementation modules
           :maxdepth: 1

        """)
    text += "".join(f"   {m}\n" for m in others)
    return text


def write(outdir: pathlib.Path) -> list[str]:
    """Writes ``index.rst`` and one page per module into ``outdir`` (only files
    whose text changed, so Sphinx rebuilds only those); returns the module names."""
    public, others = modules()
    table = entries()
    objects = {e.canonical for rows in table.values() for e in rows if kind(e.obj) != "module"}
    pages = {"index": _index(public, others)}
    for modname in public + others:
        pages[modname] = _page(modname, table[modname], shadowed=modname in objects)
    outdir.mkdir(parents=True, exist_ok=True)
    for stale in set(p.stem for p in outdir.glob("*.rst")) - set(pages):
        (outdir / f"{stale}.rst").unlink()
    for name, text in pages.items():
        path = outdir / f"{name}.rst"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return public + others


if __name__ == "__main__":
    for modname, rows in entries().items():
        for e in rows:
            if e.is_canonical:
                print(f"{e.canonical:55s} {kind(e.obj):9s} {'ok' if docstring(e) else 'NO DOCSTRING'}")
