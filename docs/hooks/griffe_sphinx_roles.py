r"""Griffe extension: turn the docstrings' Sphinx roles into mkdocstrings cross-references.

The docstrings are written for readers of the code and of ``help()``, with
Sphinx roles (``:func:`predict_flows```, ``:class:`~flowmodel.models.base.FlowModel```,
``:math:`\mu```). mkdocstrings renders Markdown, where those roles would show
as raw text. At build time this extension rewrites each role:

- a role naming a documented flowmodel object (resolved against the object's
  module, its class and the package, as Sphinx would) becomes an autorefs
  cross-reference ``[`predict_flows`][flowmodel.predict.predict_flows]``
  (``~`` keeps only the last name, as in Sphinx);
- any other target (numpy, xarray, a private helper, an undocumented
  constant) becomes inline code, so no link is broken;
- ``:math:`...``` becomes ``$...$``, which the site renders as MathML.

The docstrings themselves are not edited.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|data|attr|mod|obj|exc|const|math):`([^`]+)`")

#: The API page; only objects of the modules it documents can be linked.
API_PAGE = Path(__file__).resolve().parents[1] / "api.md"


def _documented_modules() -> set[str]:
    if not API_PAGE.exists():
        return set()
    return set(re.findall(r"^:::\s*([\w.]+)", API_PAGE.read_text(encoding="utf-8"), re.M))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package once it is loaded."""

    def __init__(self) -> None:
        self.modules = _documented_modules()
        self.converted = 0
        self.linked = 0

    # ---------------------------------------------------------------- resolution
    def _lookup(self, pkg: griffe.Module, path: str) -> Any:
        root, _, rest = path.partition(".")
        if root != pkg.name:
            return None
        try:
            obj = pkg[rest] if rest else pkg
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        if obj.is_alias:
            try:
                obj = obj.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        return obj

    def _linkable(self, obj: Any) -> bool:
        if obj is None or any(p.startswith("_") for p in obj.path.split(".")[1:]):
            return False
        if not obj.docstring and not obj.is_module:
            return False  # not rendered (show_if_no_docstring: false)
        module = obj.module.path if not obj.is_module else obj.path
        if self.modules and module not in self.modules:
            return False
        parent = obj.parent
        while parent is not None and not parent.is_module:
            if parent.path.split(".")[-1].startswith("_"):
                return False
            parent = parent.parent
        return True

    def resolve(self, pkg: griffe.Module, where: Any, target: str) -> str | None:
        """Full path of the documented object ``target`` names, seen from ``where``."""
        target = target.strip().lstrip("~.").removesuffix("()")
        scopes = []
        node = where
        while node is not None:
            scopes.append(node.path)
            node = node.parent
        candidates = [target] + [f"{scope}.{target}" for scope in scopes]
        candidates.append(f"{pkg.name}.{target}")
        for path in candidates:
            obj = self._lookup(pkg, path)
            if self._linkable(obj):
                return obj.path
        return None

    # ---------------------------------------------------------------- rewriting
    def rewrite(self, pkg: griffe.Module, where: Any, text: str) -> str:
        """Return ``text`` with every Sphinx role converted."""

        def one(match: re.Match[str]) -> str:
            role, target = match.group(1), match.group(2)
            self.converted += 1
            if role == "math":
                return f"${target}$"
            shown = target.strip()
            if shown.startswith("~"):
                shown = shown[1:].split(".")[-1]
            path = self.resolve(pkg, where, target)
            if path is None:
                return f"`{shown}`"
            self.linked += 1
            return f"[`{shown}`][{path}]"

        return ROLE.sub(one, text)

    def _walk(self, pkg: griffe.Module, obj: Any, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self.rewrite(pkg, obj, obj.docstring.value)
            obj.docstring.__dict__.pop("parsed", None)  # parse again from the new text
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(pkg, member, seen)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the docstrings of every object of ``pkg``."""
        self._walk(pkg, pkg, set())
