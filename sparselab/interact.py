"""One Plotly figure driven by ipywidgets controls, redrawn in place when a control moves.

    >>> view = sl.interact.linked_figure(
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

import plotly.graph_objects as go

__all__ = ["LinkedFigure", "linked_figure"]


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

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.values().items())
        return f"LinkedFigure({inner})"


def linked_figure(make: Callable[..., go.Figure], **controls: Any) -> LinkedFigure:
    """Display ``make(**values)`` under the given controls, redrawn when one moves.

        >>> sl.interact.linked_figure(lambda density: fig_for(density),
        ...                           density=widgets.SelectionSlider(options=[0.1, 0.3]))

    ``controls``: keyword -> ipywidgets value widget; the keyword is the argument of
    ``make`` that receives the widget's value.
    """
    return LinkedFigure(make, controls)
