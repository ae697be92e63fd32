"""A self-contained static HTML page: inline CSS, plots as data: URIs, no script and no external resource."""
from __future__ import annotations

import base64
import json
from html import escape


import pyarrow as pa

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code.tok { background: #eef3fb; border-radius: 3px; padding: 0 3px; margin: 0 2px 0 0; white-space: pre; }
img { max-width: 100%; } details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
p.note { color: #555; }
"""


def token_chip(token: str) -> str:
    """A token as a reader should see it: its exact text, spaces shown as '␣', control bytes escaped."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token).replace(" ", "␣")
    return f'<code class="tok">{escape(shown)}</code>'


def _cell(value: object, tokens: bool) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (int, float)):
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        return f'<td class="num">{text}</td>'
    if isinstance(value, list):
        return "<td>" + "".join(token_chip(str(v)) if tokens else escape(json.dumps(v)) for v in value) + "</td>"
    return f"<td>{token_chip(value) if tokens else escape(str(value))}</td>"


def table(data: pa.Table, token_columns: tuple[str, ...] = (), limit: int | None = None) -> str:
    """An HTML table of an Arrow table; token columns (and lists in them) are shown as token chips."""
    if not data.num_rows:
        return paragraph("None.", note=True)
    rows = data.slice(0, limit).to_pylist() if limit is not None else data.to_pylist()
    head = "".join(f"<th>{escape(c)}</th>" for c in data.column_names)
    body = "".join("<tr>" + "".join(_cell(v, c in token_columns) for c, v in r.items()) + "</tr>" for r in rows)
    more = f'<p class="note">{data.num_rows - len(rows)} more rows not shown.</p>' if len(rows) < data.num_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def image(png: bytes, alt: str) -> str:
    """A PNG embedded in the page itself."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def paragraph(text: str, note: bool = False) -> str:
    return f'<p{" class=note" if note else ""}>{escape(text)}</p>'


def details(summary: str, inner: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{escape(summary)}</summary>{inner}</details>"


def section(anchor: str, heading: str, *parts: str) -> tuple[str, str, str]:
    """A section with an id, so the page's navigation and a test can find it."""
    return anchor, heading, f'<section id="{escape(anchor)}"><h2>{escape(heading)}</h2>{"".join(parts)}</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document, with a navigation line linking every section."""
    nav = "".join(f'<a href="#{escape(a)}">{escape(h)}</a>' for a, h, _ in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{paragraph(subtitle, note=True)}'
            f'<nav>{nav}</nav>{"".join(html for _, _, html in sections)}</body></html>\n')
