r"""MkDocs hook: render the site's TeX as MathML at build time, so formulas need no script.

``pymdownx.arithmatex`` (generic mode) marks formulas as
``<span class="arithmatex">\(...\)</span>`` and
``<div class="arithmatex">\[...\]</div>``. This hook converts each one to
MathML with latex2mathml; browsers draw MathML natively, so the built site
shows formulas offline, with nothing loaded from a CDN. A formula
latex2mathml cannot convert fails the build (naming the page and the TeX).
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

FORMULA = re.compile(
    r'<(span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\]|\$\$(?P<dollars>.*?)\$\$)\s*</\1>',
    re.S,
)


#: A TeX command left as text in the MathML (one latex2mathml does not know).
UNKNOWN = re.compile(r">(\\[A-Za-z]+)<")


def to_mathml(text: str, where: str = "") -> str:
    """Replace every arithmatex formula in ``text`` (HTML) by MathML."""

    def one(match: re.Match[str]) -> str:
        inline = match.group("inline")
        tex = inline if inline is not None else match.group("block") or match.group("dollars")
        tex = html.unescape(tex).strip()
        display = "inline" if inline is not None else "block"
        try:
            mathml = convert(tex, display=display)
        except Exception as err:  # latex2mathml raises several exception types
            raise ValueError(
                f"{where}: cannot convert the formula {tex!r} to MathML: {type(err).__name__}"
            ) from err
        unknown = UNKNOWN.findall(mathml)
        if unknown:  # a command latex2mathml does not know is kept as raw text
            raise ValueError(
                f"{where}: cannot convert the formula {tex!r} to MathML: unknown {unknown}"
            )
        if display == "block":
            return f'<div class="arithmatex">{mathml}</div>'
        return f'<span class="arithmatex">{mathml}</span>'

    return FORMULA.sub(one, text)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """Convert the formulas of one page."""
    return to_mathml(html_text, where=getattr(page.file, "src_path", "page"))
