"""The pieces of consortia's self-contained HTML pages (report.html, stats.html).

Inline CSS only, no script, no external URL: a page renders the same
offline, years later, in any browser. Every cell and caption is escaped
unless a caller says it escaped it already.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Iterable, Sequence

UNFOLDED_ROWS = 40  # longer per-node tables start folded


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
code{font-size:.85em;word-break:break-all}.note{color:#555}
"""


def page(title: str, sections: Iterable[str]) -> str:
    """A complete HTML document with the inline stylesheet."""
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}</section>"


def figure(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def key_values(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def folded(table: str, count: int, what: str) -> str:
    """A long table (a consortium of hundreds of nodes) starts folded, the page stays short."""
    if count <= UNFOLDED_ROWS:
        return table
    return f"<details><summary>{count} {html.escape(what)}</summary>{table}</details>"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], raw: bool = False) -> str:
    """A table; cells are escaped unless `raw` (then the caller escaped them)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cell = (lambda v: v) if raw else html.escape
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def number(value: float | None, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def short_text(value: object) -> str:
    """A JSON-ish value as short text: lists joined, mappings as key: value."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {short_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return ", ".join(short_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def utc_now() -> str:
    """Now, UTC, to the second: when a page was written."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
