"""The documentation site renders offline: cross-references, MathML formulas, no CDN, no Google fonts.

Builds the site once (``mkdocs build --strict``: a broken cross-reference
fails the build) and parses every page. Allowed external addresses, none of
which the browser fetches:

- ``<a href="https://...">``: a link the reader may click (e.g. to
  exactextract's documentation, or the theme's "Made with Material" credit);
- ``<link rel="canonical">``: the page's address on the published site,
  metadata for search engines;
- namespace names (``xmlns``) in MathML and in inline SVG ``data:`` images.

Anything that would load from the network (scripts, stylesheets, fonts,
images, ``url()`` and ``@import`` in CSS) must come from the site itself.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO

HOOKS = REPO / "docs" / "hooks"
MKDOCS = Path(sys.executable).with_name("mkdocs")
URL = re.compile(r"(?i)(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}")
FETCHING = {"src", "href", "data", "poster", "srcset", "xlink:href", "action"}
ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|math|obj|exc):`")

needs_mkdocs = pytest.mark.skipif(
    not MKDOCS.exists() or importlib.util.find_spec("latex2mathml") is None,
    reason="the docs extra is not installed (pip install 'flowmodel[docs]')",
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hooks_{name}", HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fetches: list[str] = []
        self.text: list[str] = []
        self.css: list[str] = []
        self.images: list[str] = []
        self._style = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self._style = tag == "style"
        if attrs.get("style"):
            self.css.append(attrs["style"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name, value in attrs.items():
            if name not in FETCHING or not URL.search(value) or value.startswith("data:"):
                continue
            if tag == "a" or (tag == "link" and attrs.get("rel") == "canonical"):
                continue  # a link to click, or metadata: nothing is fetched
            self.fetches.append(f"<{tag} {name}={value}>")

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag):
        self._style = False

    def handle_data(self, data):
        (self.css if self._style else self.text).append(data)


def _css_fetches(css: str) -> list[str]:
    found = [u for u in re.findall(r"url\(\s*['\"]?([^)'\"]+)", css) if not u.startswith("data:")]
    found = [u for u in found if URL.search(u)]
    return found + re.findall(r"@import\s+(?:url\()?['\"]?([^;'\")]+)", css)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(MKDOCS.parent) + ":/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


# ------------------------------------------------------------------ the two hooks (fast)
@needs_mkdocs
def test_sphinx_roles_become_cross_references_or_code():
    import griffe

    ext = _load("griffe_sphinx_roles").SphinxRoles()
    pkg = griffe.load(
        "flowmodel", search_paths=[str(REPO)], extensions=griffe.load_extensions(ext)
    )
    predict = pkg["predict"]
    text = ext.rewrite(
        pkg,
        predict,
        ":func:`predict_flows` (see :class:`~flowmodel.models.base.FlowModel`, "
        ":func:`numpy.quantile`, :func:`_summarise`, :math:`\\mu_{ij}`)",
    )
    assert text == (
        "[`predict_flows`][flowmodel.predict.predict_flows] (see "
        "[`FlowModel`][flowmodel.models.base.FlowModel], `numpy.quantile`, `_summarise`, "
        "$\\mu_{ij}$)"
    )
    # a method named from inside its class resolves against the class
    fit = pkg["models.base.FlowModel.fit"]
    assert ext.rewrite(pkg, fit, ":meth:`predict`") == (
        "[`predict`][flowmodel.models.base.FlowModel.predict]"
    )
    # the package was rewritten on load: no role is left in any docstring
    left = []

    def walk(obj, seen):
        if obj.path in seen or obj.is_alias:
            return
        seen.add(obj.path)
        if obj.docstring and ROLE.search(obj.docstring.value):
            left.append(obj.path)
        for member in obj.members.values():
            walk(member, seen)

    walk(pkg, set())
    assert left == []


@needs_mkdocs
def test_tex_becomes_mathml():
    hook = _load("mathml")
    html = (
        '<p>flow <span class="arithmatex">\\(\\mu_{ij} &lt; 1\\)</span></p>'
        '<div class="arithmatex">\\[\\log \\mu = \\alpha + \\beta x\\]</div>'
    )
    out = hook.to_mathml(html)
    assert out.count("<math") == 2 and "\\(" not in out and "\\[" not in out
    assert 'display="block"' in out and "<msub>" in out
    assert "&#x0003C;" in out or "&lt;" in out  # the escaped < of the TeX, not markup
    with pytest.raises(ValueError, match=r"page.md: cannot convert the formula"):
        hook.to_mathml('<span class="arithmatex">\\(x^\\)</span>', where="page.md")
    with pytest.raises(ValueError, match=r"unknown.*unknowncmd"):
        hook.to_mathml('<span class="arithmatex">\\(\\unknowncmd x\\)</span>')


# ------------------------------------------------------------------ the built site (slower)
@needs_mkdocs
def test_site_loads_nothing_from_the_network(site):
    problems = []
    for page in sorted(site.rglob("*.html")):
        parsed = _Page()
        parsed.feed(page.read_text(encoding="utf-8"))
        problems += [f"{page.relative_to(site)}: {f}" for f in parsed.fetches]
        problems += [
            f"{page.relative_to(site)}: css {u}" for css in parsed.css for u in _css_fetches(css)
        ]
        for src in parsed.images:
            assert src.startswith("data:") or (page.parent / src).resolve().exists(), src
    for sheet in site.rglob("*.css"):
        problems += [f"{sheet.relative_to(site)}: {u}" for u in _css_fetches(sheet.read_text())]
    assert problems == []
    assert not list(site.rglob("*fonts.googleapis*"))
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in index and "fonts.gstatic.com" not in index
    assert "mathjax" not in index.lower() and "unpkg.com" not in index


@needs_mkdocs
def test_api_pages_show_no_raw_roles_and_link_objects(site):
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(api)
    text = "".join(page.text)
    assert ROLE.findall(text) == []
    assert api.count('class="autorefs autorefs-internal"') > 150
    assert 'href="#flowmodel.totals.predict_totals"' in api
    for html in site.rglob("*.html"):
        body = _Page()
        body.feed(html.read_text(encoding="utf-8"))
        assert ROLE.findall("".join(body.text)) == [], html


@needs_mkdocs
def test_formulas_are_mathml_and_the_report_screenshot_is_shown(site):
    models = (site / "models" / "index.html").read_text(encoding="utf-8")
    assert models.count("<math") > 20
    assert "\\(" not in models and "\\[" not in models
    index = (site / "index.html").read_text(encoding="utf-8")
    assert (
        'src="img/report.png"' in index and (site / "img" / "report.png").stat().st_size > 20_000
    )
    assert "show_versions()" in index


def test_docs_i_own_reference_nothing_outside_the_repository():
    for name in ("index.md", "outputs.md", "api.md", "quickstart.md"):
        text = (REPO / "docs" / name).read_text(encoding="utf-8")
        assert "DESIGN" not in text and "REFERENCES.md" not in text and "/work/" not in text, name
    assert shutil.which("true")  # keep the module importable without mkdocs
