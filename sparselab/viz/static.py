"""Figures that outlive the kernel: every displayed figure also carries a static copy.

    >>> view = sl.viz.interact.linked_figure(make, layer=slider)   # widget + static copy
    >>> sl.viz.keep(my_vbox_of_figure_widgets)      # any ipywidgets container, same idea
    >>> bundle = static_bundle(fig)                 # {plotly json, text/html} of one figure
    >>> one = stack({"density": fig_a, "heatmap": fig_b})   # several figures, one stacked

An ipywidgets figure lives in the kernel: saved without widget state (sparselab's
notebooks are committed stripped), its output is blank in ``nbconvert --to html``, a
static viewer, or JupyterLab reopened without a kernel. So the widgets sparselab
displays (:class:`~sparselab.viz.interact.LinkedFigure`, the dashboard, :func:`keep`)
put two more representations of their figure *as displayed* into the same output:

- ``application/vnd.plotly.v1+json``: rendered by JupyterLab (jupyterlab-plotly, a safe
  renderer, so also in untrusted notebooks), VS Code and nbviewer-like tools;
- ``text/html``: the figure as Plotly HTML, what ``nbconvert --to html`` shows (its
  widget filter skips widget views that have no saved state).

A live, trusted JupyterLab still prefers the widget (its renderer ranks first). Plain
``go.Figure`` outputs get the same ``text/html`` through the ``"sparselab"`` Plotly
renderer, added to the default renderer by :func:`install` (called on import of
:mod:`sparselab.viz` inside an IPython kernel, never replacing a renderer the user chose).

plotly.js (~4.7 MB) is inlined into the first HTML output of a kernel only; later ones
use it from the page. (Re-running only that first cell drops it from the saved notebook;
"Restart and run all" puts it back. :func:`reset_plotlyjs` forces it into the next one.)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.basedatatypes import BaseFigure

__all__ = [
    "PLOTLY_MIMETYPE",
    "RENDERER",
    "StaticCopy",
    "figure_widgets",
    "install",
    "keep",
    "reset_plotlyjs",
    "stack",
    "static_bundle",
]

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"
WIDGET_MIMETYPE = "application/vnd.jupyter.widget-view+json"
RENDERER = "sparselab"
CONFIG = {"displaylogo": False, "responsive": True}

_state = {"plotlyjs_sent": False}


def reset_plotlyjs() -> None:
    """Inline plotly.js again in the next static HTML output (e.g. after clearing outputs)."""
    _state["plotlyjs_sent"] = False


def _html(fig: BaseFigure, height: int | None = None) -> str:
    first = not _state["plotlyjs_sent"]
    _state["plotlyjs_sent"] = True
    return fig.to_html(full_html=False, include_plotlyjs=first, include_mathjax=False, config=CONFIG,
                       default_height=height or "100%")


def static_bundle(figures: BaseFigure | Mapping[str, BaseFigure] | Sequence[BaseFigure],
                  html: bool = True) -> dict[str, Any]:
    """The static representations of one figure, or of several shown together.

        >>> b = static_bundle(fig); sorted(b)
        ['application/vnd.plotly.v1+json', 'text/html']

    Several figures: ``text/html`` holds each one (as shown), the Plotly JSON one
    :func:`stack` of them (one output can carry one Plotly figure).
    """
    named = _as_named(figures)
    one = next(iter(named.values())) if len(named) == 1 else stack(named)
    out: dict[str, Any] = {PLOTLY_MIMETYPE: {**go.Figure(one).to_plotly_json(), "config": CONFIG}}
    if html:
        out["text/html"] = "\n".join(_html(f, _height(f)) for f in named.values())
    return out


def _height(fig: BaseFigure) -> int:
    return int(fig.layout.height or 450)


def _as_named(figures: Any) -> dict[str, BaseFigure]:
    if isinstance(figures, BaseFigure):
        items = [("", figures)]
    elif isinstance(figures, Mapping):
        items = list(figures.items())
    elif isinstance(figures, Sequence) and not isinstance(figures, str):
        items = [("", f) for f in figures]
    else:
        raise TypeError(f"expected a plotly figure, a dict or a list of them, got {type(figures).__name__}")
    if not items:
        raise ValueError("no figures to render")
    out: dict[str, BaseFigure] = {}
    for i, (name, fig) in enumerate(items):
        if not isinstance(fig, BaseFigure):
            raise TypeError(f"figure {name or i!r} is a {type(fig).__name__}, not a plotly figure")
        out[str(name) or f"figure {i + 1}"] = fig
    return out


# ------------------------------------------------------------------ stacking figures

_AXIS_KEY = re.compile(r"^([xy])axis(\d*)$")
_AXIS_REF = re.compile(r"^([xy])(\d*)( domain)?$")


def _axis_number(n: str) -> int:
    return int(n) if n else 1


def stack(figures: Mapping[str, BaseFigure] | Sequence[BaseFigure], gap: float = 0.06) -> go.Figure:
    """One figure holding ``figures`` one below the other (own axes, titles and heights).

        >>> one = stack({"density": fig_a, "heatmap": fig_b})
        >>> len(one.data) == len(fig_a.data) + len(fig_b.data)
        True

    Each figure keeps its traces and subplots: its axes are renumbered, its vertical
    domains (and paper-referenced shapes, annotations and colour bars) squeezed into its
    band, its title becomes an annotation above the band. Legends merge into one.
    """
    named = _as_named(figures)
    heights = [_height(f) for f in named.values()]
    total = float(sum(heights))
    n = len(named)
    usable = 1.0 - gap * (n - 1)
    out = go.Figure()
    layout: dict[str, Any] = {"height": int(total + 40 * (n - 1)), "template": "plotly_white", "meta": {"stacked": n},
                              "annotations": [], "shapes": [], "margin": {"t": 60, "b": 60}}
    next_axis = {"x": 1, "y": 1}
    top = 1.0
    traces: list[dict[str, Any]] = []
    for (name, fig), h in zip(named.items(), heights, strict=True):
        band = usable * h / total
        lo, hi = top - band, top
        top = lo - gap
        spec = fig.to_plotly_json()
        lay = spec.get("layout", {})
        # axis renumbering: every axis the figure uses (layout keys and trace refs)
        used = {"x": {"1"}, "y": {"1"}}
        for key in lay:
            m = _AXIS_KEY.match(key)
            if m:
                used[m.group(1)].add(str(_axis_number(m.group(2))))
        for t in spec.get("data", []):
            for letter in "xy":
                ref = t.get(f"{letter}axis", letter)
                used[letter].add(str(_axis_number(ref[1:])))
        rename: dict[str, dict[str, str]] = {"x": {}, "y": {}}
        for letter in "xy":
            for old in sorted(used[letter], key=int):
                rename[letter][old] = str(next_axis[letter])
                next_axis[letter] += 1

        def ref(letter: str, old: str, rename: dict = rename) -> str:
            num = rename[letter][str(_axis_number(old))]
            return letter if num == "1" else f"{letter}{num}"

        def squeeze(y: float, lo: float = lo, hi: float = hi) -> float:
            return min(1.0, max(0.0, lo + float(y) * (hi - lo)))

        for letter in "xy":
            for old, new in rename[letter].items():
                axis = copy.deepcopy(lay.get(f"{letter}axis" if old == "1" else f"{letter}axis{old}", {}))
                axis.pop("anchor", None)
                axis.pop("overlaying", None)
                other = "y" if letter == "x" else "x"
                partner = rename[other].get(old) or next(iter(rename[other].values()))
                axis["anchor"] = other if partner == "1" else f"{other}{partner}"
                if letter == "y":
                    d0, d1 = axis.get("domain", [0.0, 1.0])
                    axis["domain"] = [squeeze(d0), squeeze(d1)]
                else:
                    # an x axis sits at the bottom of its y domain
                    axis.setdefault("domain", [0.0, 1.0])
                for k in ("matches", "scaleanchor"):
                    if isinstance(axis.get(k), str):
                        m = _AXIS_REF.match(axis[k])
                        if m:
                            axis[k] = ref(m.group(1), m.group(2))
                layout[f"{letter}axis" if new == "1" else f"{letter}axis{new}"] = axis
        for t in spec.get("data", []):
            t = copy.deepcopy(t)
            if t.get("type") in ("bar", "scatter", "heatmap", "histogram", "box", "violin", "scattergl",
                                 "contour", "histogram2d", "image", "waterfall", "funnel"):
                t["xaxis"] = ref("x", t.get("xaxis", "x")[1:])
                t["yaxis"] = ref("y", t.get("yaxis", "y")[1:])
            if "colorbar" in t or t.get("type") in ("heatmap", "contour", "histogram2d"):
                bar = dict(t.get("colorbar") or {})
                bar["y"] = squeeze(bar.get("y", 0.5))
                bar["len"] = float(bar.get("len", 1.0)) * (hi - lo)
                bar.setdefault("yanchor", "middle")
                t["colorbar"] = bar
            traces.append(t)
        for kind in ("annotations", "shapes"):
            for item in lay.get(kind, []) or []:
                item = copy.deepcopy(item)
                for letter in "xy":
                    key = f"{letter}ref"
                    value = item.get(key, "paper" if kind == "annotations" else letter)
                    m = _AXIS_REF.match(str(value))
                    if m:
                        item[key] = ref(letter, m.group(2)) + (m.group(3) or "")
                    elif value == "paper" and letter == "y":
                        for k in ("y", "y0", "y1"):
                            if k in item:
                                item[k] = squeeze(item[k])
                layout[kind].append(item)
        title = ((lay.get("title") or {}).get("text")) or name
        layout["annotations"].append({"text": f"<b>{title}</b>", "xref": "paper", "yref": "paper", "x": 0.0,
                                      "y": hi, "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                                      "font": {"size": 14}})
        for key in ("barmode", "bargap", "coloraxis", "hovermode"):
            if key in lay and key not in layout:
                layout[key] = lay[key]
    out.add_traces(traces)
    out.update_layout(layout)
    return out


# ------------------------------------------------------------------ widgets


def figure_widgets(widget: Any) -> list[go.FigureWidget]:
    """Every ``go.FigureWidget`` inside an ipywidgets container (depth first, tab order)."""
    found: list[go.FigureWidget] = []
    stack_: list[Any] = [widget]
    seen: set[int] = set()
    while stack_:
        w = stack_.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        if isinstance(w, go.FigureWidget):
            found.append(w)
            continue
        children = getattr(w, "children", None)
        if children:
            stack_.extend(reversed(list(children)))
    return found


# a live widget (rendered by JupyterLab, or by the widget manager of an exported page)
# hides the static copy right after it; where the widget cannot render it stays visible
_HIDE_CSS = ("<style>.jp-OutputArea-child:has(.widget-container, .js-plotly-plot) + .jp-OutputArea-child "
             ".sparselab-static, .output_area:has(.widget-container, .js-plotly-plot) + .output_area "
             ".sparselab-static {display: none;}</style>")


def widget_bundle(widget: Any, figures: Mapping[str, BaseFigure] | None = None) -> dict[str, Any]:
    """The widget's own mimebundle plus the Plotly JSON of its figures (as they are now).

    A live, trusted JupyterLab prefers the widget; an untrusted one (a notebook reopened
    from disk) or a viewer that knows no widgets shows the Plotly figure.
    """
    bundle = widget._repr_mimebundle_()
    data = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
    figs = _figures_of(widget, figures)
    if figs:
        data[PLOTLY_MIMETYPE] = static_bundle(figs, html=False)[PLOTLY_MIMETYPE]
        data["text/plain"] = f"[interactive figure: {', '.join(figs)}]"
    return data


def static_html(widget: Any, figures: Mapping[str, BaseFigure] | None = None) -> dict[str, str]:
    """The ``text/html`` output shown after a widget: its figures as Plotly HTML, hidden by
    CSS wherever the widget itself renders."""
    figs = _figures_of(widget, figures)
    return {"text/html": _HIDE_CSS + f'<div class="sparselab-static">{static_bundle(figs)["text/html"]}</div>'}


def _figures_of(widget: Any, figures: Mapping[str, BaseFigure] | None) -> dict[str, BaseFigure]:
    if figures is not None:
        return dict(figures)
    return {(f.layout.title.text or f"figure {i + 1}"): go.Figure(f) for i, f in enumerate(figure_widgets(widget))}


def display_with_copy(widget: Any, figures: Mapping[str, BaseFigure] | None = None) -> None:
    """Display ``widget`` (plus the Plotly JSON of its figures), then their static HTML copy."""
    from IPython.display import display

    display(widget_bundle(widget, figures), raw=True)
    if _figures_of(widget, figures):
        display(static_html(widget, figures), raw=True)


class StaticCopy:
    """What :func:`keep` returns: displays ``widget`` plus the static copy of its figures."""

    def __init__(self, widget: Any) -> None:
        if not hasattr(widget, "_repr_mimebundle_"):
            raise TypeError(f"keep() expects an ipywidgets widget, got {type(widget).__name__}")
        if not figure_widgets(widget):
            raise ValueError("the widget holds no go.FigureWidget; display a plain figure as it is")
        self.widget = widget

    def _ipython_display_(self) -> None:
        display_with_copy(self.widget)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None):
        return widget_bundle(self.widget)

    def __repr__(self) -> str:
        return f"keep({type(self.widget).__name__} with {len(figure_widgets(self.widget))} figure(s))"


def keep(widget: Any) -> StaticCopy:
    """Display an ipywidgets container of figures so that the figures survive the kernel.

        >>> box = widgets.VBox([slider, go.FigureWidget(fig)])
        >>> sl.viz.keep(box)          # last expression of a cell

    Two outputs: the widget (live; with the Plotly JSON of its figures for viewers that
    cannot show widgets) and the figures' current state as Plotly HTML (several: one
    after the other), which a live widget hides.
    """
    return StaticCopy(widget)


# ------------------------------------------------------------------ plain figures


class _HtmlRenderer(pio.base_renderers.MimetypeRenderer):
    """Plotly renderer adding ``text/html`` (plotly.js once per kernel) to a figure output."""

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        return {"text/html": _html(go.Figure(fig_dict))}


def install() -> None:
    """Register the ``"sparselab"`` Plotly renderer and add it to the default one.

    Idempotent. Only touches Plotly's automatic default (``plotly_mimetype`` and its
    combinations chosen by Plotly); a renderer the user set stays as it is.
    """
    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = _HtmlRenderer()
    current = pio.renderers.default or ""
    parts = current.split("+") if current else []
    if RENDERER in parts:
        return
    if parts and all(p in ("plotly_mimetype", "notebook", "notebook_connected", "jupyterlab", "nteract",
                           "vscode") for p in parts):
        pio.renderers.default = "+".join(["plotly_mimetype", RENDERER])


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
