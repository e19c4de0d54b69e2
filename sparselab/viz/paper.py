"""Paper-ready files of a figure: SVG, PDF and PNG in the shared paper style, one call.

    >>> sl.viz.export(fig, "figures/density")                       # .svg .pdf .png
    >>> sl.viz.export(fig, "out/reuse", formats=("pdf",), layout="two-column")
    [PosixPath('out/reuse.pdf')]
    >>> paper = paper_style(fig, "one-column")                      # the styled copy only

Plotly's own export through ``kaleido`` (1.x), which drives a headless Chromium. The
browser is Debian's (``/usr/bin/chromium``, passed to kaleido as ``BROWSER_PATH``) or the
one ``BROWSER_PATH`` already names; sparselab never downloads one, and says what to
install when none is there. All formats of one call share one browser start.

The paper style (:data:`LAYOUTS`, :data:`PALETTE`): a column-wide size, a sans-serif font
readable when printed at that width, the Okabe-Ito colour-blind-safe colour cycle for
traces without their own colour, a white background and no interactive chrome (a file
has no modebar). Figures are copied, never changed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.basedatatypes import BaseFigure

__all__ = ["FORMATS", "LAYOUTS", "PALETTE", "browser_path", "export", "paper_style"]

FORMATS = ("svg", "pdf", "png")
# (width, height) in CSS pixels (1/96 inch): 3.5 in and 7.2 in wide, the usual column widths
LAYOUTS = {"one-column": (336, 252), "two-column": (691, 360)}
# Okabe & Ito (2008), distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
FONT = {"family": "Arial, Helvetica, 'DejaVu Sans', sans-serif", "size": 10, "color": "#000000"}
PNG_SCALE = 3  # 288 dpi at the column width
_DEBIAN_CHROMIUM = "/usr/bin/chromium"


def browser_path() -> str:
    """The Chromium kaleido will use: ``$BROWSER_PATH`` or Debian's; raises if neither."""
    named = os.environ.get("BROWSER_PATH")
    for candidate in (named, _DEBIAN_CHROMIUM, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    where = f"BROWSER_PATH={named!r} is not an executable; " if named else ""
    raise RuntimeError(
        f"{where}figure export needs a Chromium and none was found (sparselab never downloads one). "
        "Install Debian's: `sudo apt-get install chromium` (then /usr/bin/chromium is used), or set "
        "BROWSER_PATH to an installed Chrome/Chromium."
    )


def paper_style(fig: BaseFigure, layout: str = "one-column", width: int | None = None,
                height: int | None = None) -> go.Figure:
    """A copy of ``fig`` in the paper style at the size of ``layout`` (or ``width``/``height``).

        >>> paper_style(fig, "two-column").layout.width
        691
    """
    if not isinstance(fig, BaseFigure):
        raise TypeError(f"expected a plotly figure, got {type(fig).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    w, h = LAYOUTS[layout]
    w, h = int(width or w), int(height or h)
    if w <= 0 or h <= 0:
        raise ValueError(f"width and height must be positive, got {w} x {h}")
    out = go.Figure(fig)
    out.update_layout(
        width=w, height=h, autosize=False, font=FONT, colorway=list(PALETTE),
        paper_bgcolor="white", plot_bgcolor="white",
        title={"font": {"size": FONT["size"] + 2}, "x": 0.0, "xref": "paper", "xanchor": "left"},
        legend={"font": {"size": FONT["size"] - 1}},
        margin={"l": 55, "r": 15, "t": 40 if out.layout.title.text else 15, "b": 45},
    )
    # a file is read in print: thin dark axes with ticks, a light grid
    out.update_xaxes(showline=True, linecolor="black", linewidth=0.8, ticks="outside", gridcolor="#e5e5e5")
    out.update_yaxes(showline=True, linecolor="black", linewidth=0.8, ticks="outside", gridcolor="#e5e5e5")
    return out


def export(
    fig: BaseFigure,
    path_stem: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    layout: str = "one-column",
    width: int | None = None,
    height: int | None = None,
    scale: float = PNG_SCALE,
    style: bool = True,
) -> list[Path]:
    """Write ``fig`` to ``path_stem.<format>`` for each of ``formats``; return the paths.

        >>> export(fig, "paper/fig3", layout="two-column")
        [PosixPath('paper/fig3.svg'), PosixPath('paper/fig3.pdf'), PosixPath('paper/fig3.png')]

    ``layout``: ``"one-column"`` or ``"two-column"`` (:data:`LAYOUTS`), overridden by
    ``width``/``height`` in CSS pixels; SVG and PDF are that size in points-at-96-dpi,
    the PNG is ``scale`` times larger. ``style=False`` keeps the figure's own look (only
    the size is set). Parent folders are created; existing files are replaced.
    """
    formats = tuple(str(f).lower().lstrip(".") for f in ([formats] if isinstance(formats, str) else formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be among {FORMATS}, got {list(formats)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    styled = paper_style(fig, layout, width, height)
    if not style:
        styled = go.Figure(fig).update_layout(width=styled.layout.width, height=styled.layout.height,
                                              autosize=False)
    os.environ["BROWSER_PATH"] = browser_path()  # checked before anything is written
    try:
        import kaleido
    except ImportError as err:
        raise RuntimeError("figure export needs kaleido 1.x: pip install 'kaleido>=1.0,<2'") from err

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{f}") for f in formats]
    spec = styled.to_dict()
    jobs = [{"fig": spec, "path": str(p),
             "opts": {"format": f, "width": styled.layout.width, "height": styled.layout.height,
                      "scale": scale if f == "png" else 1}}
            for f, p in zip(formats, paths, strict=True)]
    kaleido.write_fig_from_object_sync(jobs)
    missing = [str(p) for p in paths if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise RuntimeError(f"kaleido wrote no data to {missing}")
    return paths
