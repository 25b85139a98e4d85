"""Self-contained HTML reports: headings, text, pandas tables and plotly figures in one file."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from safety_circuits._io import atomic_file

Block = str | pd.DataFrame | go.Figure
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; }
p.meta { color: #777; font-size: 0.85em; }
"""


def render(title: str, sections: Sequence[tuple[str, Sequence[Block]]]) -> str:
    """HTML for ``sections`` of (heading, blocks); plotly.js is inlined once (works offline)."""
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
    ]
    first_figure = True
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, go.Figure):
                parts.append(block.to_html(full_html=False, include_plotlyjs=first_figure))
                first_figure = False
            elif isinstance(block, pd.DataFrame):
                parts.append(block.to_html(float_format=lambda v: f"{v:.4g}", border=0))
            else:
                parts.append(f"<p>{html.escape(str(block))}</p>")
    body = "\n".join(parts)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def write_report(
    path: str | os.PathLike, title: str, sections: Sequence[tuple[str, Sequence[Block]]]
) -> Path:
    """Write :func:`render`'s HTML atomically to ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(render(title, sections), encoding="utf-8")
    return Path(path)
