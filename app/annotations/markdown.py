"""Notes in Markdown, rendered to safe HTML: markdown-it-py (CommonMark, raw HTML off: a tag in a note is
shown as text) and then nh3 (Ammonia) with an allow-list of tags and attributes, links limited to
http(s) and mailto and given rel="noopener noreferrer nofollow". No script, event handler, style,
javascript: URL or comment survives either step."""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table").enable("strikethrough")
TAGS = {"p", "br", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li", "a", "h3", "h4", "h5", "h6", "hr", "del", "s",
        "table", "thead", "tbody", "tr", "th", "td"}  # fmt: skip
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}
URL_SCHEMES = {"http", "https", "mailto"}
MAX_NOTE = 20_000  # characters


def render(note: str) -> Markup:
    html = _MD.render(note or "")
    clean = nh3.clean(
        html, tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES, link_rel="noopener noreferrer nofollow", strip_comments=True
    )
    return Markup(clean)  # noqa: S704 - sanitised by nh3 just above
