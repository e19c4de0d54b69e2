"""One Plotly figure driven by ipywidgets controls, redrawn in place when a control moves.

    >>> view = sl.viz.interact.linked_figure(
    ...     lambda layer: sl.figures.batch_union_curves(df, layers=[layer]),
    ...     layer=widgets.IntSlider(value=0, min=0, max=29),
    ... )
    >>> view                       # last expression of a cell: controls above the figure
    >>> view.set(layer=12)         # programmatic, same path as moving the slider

The figure is a ``go.FigureWidget`` created once; each change calls ``make`` with the
current value of every control and copies the new figure's traces and layout into it,
so the output area is not re-created (no flicker, zoom state kept by the browser) and
``make`` stays an ordinary figure function that tests can call without widgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = ["SYNCED_LAYOUT_KEYS", "LinkedFigure", "linked_figure", "sent_state", "sync_figure"]


class LinkedFigure:
    """Controls plus a ``FigureWidget`` kept equal to ``make(**values)``.

        >>> view = LinkedFigure(make, {"layer": slider})
        >>> view.set(layer=3); view.figure.layout.title.text

    Attributes: ``widget`` (the VBox to display), ``figure`` (the FigureWidget),
    ``controls`` (name -> widget), ``last_update_seconds``.
    """

    def __init__(self, make: Callable[..., go.Figure], controls: dict[str, Any]) -> None:
        import ipywidgets as widgets

        if not callable(make):
            raise TypeError(f"make must be a function returning a plotly figure, got {type(make).__name__}")
        if not controls:
            raise ValueError("give at least one control, e.g. layer=widgets.IntSlider(...)")
        for name, control in controls.items():
            if not isinstance(control, widgets.ValueWidget):
                raise TypeError(f"control {name!r} is a {type(control).__name__}, not an ipywidgets value widget")
        self.make = make
        self.controls = dict(controls)
        first = self._build()
        self.figure = go.FigureWidget(first)
        self.last_update_seconds = float("nan")
        self.widget = widgets.VBox([widgets.HBox(list(self.controls.values())), self.figure])
        for control in self.controls.values():
            control.observe(lambda _change: self.update(), names="value")

    def values(self) -> dict[str, Any]:
        """Current value of every control, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def _build(self) -> go.Figure:
        fig = self.make(**self.values())
        if not isinstance(fig, go.Figure):
            raise TypeError(f"make returned {type(fig).__name__}, expected a plotly go.Figure")
        return fig

    def update(self) -> None:
        """Rebuild the figure from the controls' current values and copy it in place."""
        start = time.perf_counter()
        new = self._build()
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.add_traces(list(new.data))
            self.figure.layout = new.layout
        self.last_update_seconds = time.perf_counter() - start

    def set(self, **values: Any) -> LinkedFigure:
        """Set controls by name (each change redraws, as a slider move would)."""
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise KeyError(f"unknown control(s) {unknown}; controls: {sorted(self.controls)}")
        for name, value in values.items():
            self.controls[name].value = value
        return self

    def _ipython_display_(self) -> None:
        # the widget, then its figures as shown now for viewers without a kernel (.static)
        from sparselab.viz.static import display_with_copy

        display_with_copy(self.widget, {"figure": go.Figure(self.figure)})

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None):
        from sparselab.viz.static import widget_bundle

        return widget_bundle(self.widget, {"figure": go.Figure(self.figure)})

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.values().items())
        return f"LinkedFigure({inner})"


def linked_figure(make: Callable[..., go.Figure], **controls: Any) -> LinkedFigure:
    """Display ``make(**values)`` under the given controls, redrawn when one moves.

        >>> sl.viz.interact.linked_figure(lambda density: fig_for(density),
        ...                           density=widgets.SelectionSlider(options=[0.1, 0.3]))

    ``controls``: keyword -> ipywidgets value widget; the keyword is the argument of
    ``make`` that receives the widget's value.
    """
    return LinkedFigure(make, controls)


# ------------------------------------------------------------------ in-place updates


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except ValueError:  # nested containers holding arrays
        return False


SYNCED_LAYOUT_KEYS = ("title", "shapes", "annotations")


def sync_figure(target: go.FigureWidget, source: go.Figure, previous: dict[str, Any]) -> None:
    """Copy what changed in ``source`` into a displayed figure, without re-creating it.

    ``previous`` remembers what was sent last time (per figure), so unchanged properties
    (e.g. the heatmap's axis labels while only the threshold moves) are neither
    re-validated nor re-sent to the browser.
    """
    specs = [t.to_plotly_json() for t in source.data]
    layout = {k: source.layout[k] for k in SYNCED_LAYOUT_KEYS}
    old_specs = previous.get("traces")
    if old_specs is None or [s["type"] for s in specs] != [s["type"] for s in old_specs]:
        target.data = ()
        target.add_traces(list(source.data))
        changed_traces = []
    else:
        changed_traces = []
        for i, (spec, old) in enumerate(zip(specs, old_specs, strict=True)):
            delta = {k: v for k, v in spec.items() if k not in ("type", "uid") and not _same(v, old.get(k))}
            if delta:
                changed_traces.append((i, delta))
    with target.batch_update():
        for i, delta in changed_traces:
            target.data[i].update(delta, overwrite=True)
        for key, value in layout.items():
            if key not in previous.get("layout", {}) or previous["layout"][key] != value:
                target.layout[key] = value
    previous["traces"] = specs
    previous["layout"] = layout


def sent_state(fig: go.Figure) -> dict[str, Any]:
    """What :func:`sync_figure` remembers of a figure just displayed as a widget."""
    return {"traces": [t.to_plotly_json() for t in fig.data],
            "layout": {k: fig.layout[k] for k in SYNCED_LAYOUT_KEYS}}
