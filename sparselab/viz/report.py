"""Self-contained HTML reports: figures, tables and the setup that produced them, one file.

    >>> figs = {"Density by layer": sl.figures.density_by_layer(sl.metrics.density(masks))}
    >>> sl.report(figs, "report.html", title="Calibrated 50 %", tables={"summary": table})
    PosixPath('report.html')

plotly.js is embedded inline once (with the first figure), nothing is fetched from a CDN,
so the file opens offline and can be mailed or archived as is. Tables are plain HTML;
``meta`` (configuration) and the library versions are printed at the end as JSON.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from plotly.basedatatypes import BaseFigure

from sparselab._version import versions

__all__ = ["report"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.stamp { color: #666; font-size: 0.9rem; }
nav ul { columns: 2; font-size: 0.95rem; }
table.sl-table { border-collapse: collapse; font-size: 0.85rem; }
table.sl-table th, table.sl-table td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
table.sl-table thead th { background: #f3f5f9; }
pre.sl-meta { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
"""


def _named_figures(figures: Mapping[str, Any] | Sequence[Any]) -> list[tuple[str, BaseFigure]]:
    if isinstance(figures, Mapping):
        items = [(str(k), v) for k, v in figures.items()]
    elif isinstance(figures, BaseFigure):
        items = [("", figures)]
    else:
        items = [("", f) for f in figures]
    out = []
    for i, (name, fig) in enumerate(items):
        if not isinstance(fig, BaseFigure):
            raise TypeError(f"figure {name or i!r} is a {type(fig).__name__}, not a plotly figure")
        if not name:
            name = fig.layout.title.text or f"Figure {i + 1}"
        out.append((name, fig))
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _anchor(i: int, kind: str) -> str:
    return f"{kind}-{i + 1}"


def report(
    figures: Mapping[str, Any] | Sequence[Any],
    path: str | os.PathLike,
    title: str = "sparselab report",
    tables: Mapping[str, pd.DataFrame] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write figures, tables and metadata to one self-contained HTML file; return its path.

        >>> sl.report([fig_a, fig_b], "out/report.html", meta={"rule": rule.describe()})

    ``figures``: ``{section title: figure}`` or a list (section titles then come from the
    figures' own titles). ``tables``: ``{section title: DataFrame}``. ``meta``: anything
    JSON-able describing the run; the versions of sparselab and its numerical libraries
    are always added under ``"versions"`` (unless ``meta`` already has that key). The
    file is written atomically (temp file + rename); parent folders are created.
    """
    named = _named_figures(figures)
    tables = dict(tables or {})
    for name, table in tables.items():
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"table {name!r} is a {type(table).__name__}, not a pandas DataFrame")
    info: dict[str, Any] = dict(meta or {})
    info.setdefault("versions", versions())
    try:
        meta_text = json.dumps(info, indent=2, sort_keys=False, default=str)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta is not JSON-serialisable: {err}") from err
    own_version = info["versions"].get("sparselab", "?") if isinstance(info["versions"], dict) else "?"

    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="stamp">written {_dt.datetime.now().isoformat(timespec="seconds")} '
        f"by sparselab {html.escape(str(own_version))}</p>",
    ]
    toc = [f'<li><a href="#{_anchor(i, "figure")}">{html.escape(n)}</a></li>' for i, (n, _) in enumerate(named)]
    toc += [f'<li><a href="#{_anchor(i, "table")}">{html.escape(n)}</a></li>' for i, n in enumerate(tables)]
    toc.append('<li><a href="#meta">Configuration and versions</a></li>')
    parts.append(f"<nav><ul>{''.join(toc)}</ul></nav>")

    for i, (name, fig) in enumerate(named):
        # plotly.js (~4.7 MB) goes inline exactly once; later figures reuse the global
        body = fig.to_html(
            full_html=False,
            include_plotlyjs=(i == 0),
            include_mathjax=False,
            config={"displaylogo": False, "responsive": True},
        )
        parts.append(f'<section id="{_anchor(i, "figure")}"><h2>{html.escape(name)}</h2>{body}</section>')
    for i, (name, table) in enumerate(tables.items()):
        body = table.to_html(classes="sl-table", border=0, index=False, float_format=lambda v: f"{v:.4g}")
        parts.append(f'<section id="{_anchor(i, "table")}"><h2>{html.escape(name)}</h2>{body}</section>')
    parts.append(
        f'<section id="meta"><h2>Configuration and versions</h2>'
        f'<pre class="sl-meta">{html.escape(meta_text, quote=False)}</pre></section>'
    )
    parts.append("</body></html>")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
