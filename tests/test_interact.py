"""sl.viz.interact.linked_figure: controls redraw one FigureWidget in place."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import pytest

from sparselab.viz import interact


def _make(n: int, label: str = "a") -> go.Figure:
    fig = go.Figure(layout={"title": {"text": f"{label}: {n} lines"}})
    for i in range(n):
        fig.add_scatter(x=[0, 1], y=[i, i + n])
    if n == 1:
        fig.add_hline(y=0.5)
    return fig


def test_moving_a_control_redraws_the_same_widget():
    view = interact.linked_figure(_make, n=widgets.IntSlider(value=1, min=1, max=4),
                                  label=widgets.Dropdown(options=["a", "b"], value="a"))
    fig = view.figure
    assert isinstance(fig, go.FigureWidget)
    assert (len(fig.data), fig.layout.title.text, len(fig.layout.shapes)) == (1, "a: 1 lines", 1)
    view.controls["n"].value = 3  # what a slider move does
    assert view.figure is fig
    assert (len(fig.data), fig.layout.title.text) == (3, "a: 3 lines")
    assert len(fig.layout.shapes) == 0  # the old layout is replaced, not merged
    assert list(fig.data[2].y) == [2, 5]
    view.set(label="b")
    assert fig.layout.title.text == "b: 3 lines"
    assert view.values() == {"n": 3, "label": "b"}
    assert view.last_update_seconds >= 0
    assert "application/vnd.jupyter.widget-view+json" in view._repr_mimebundle_()


def test_clear_errors():
    slider = widgets.IntSlider(value=1, min=1, max=3)
    with pytest.raises(ValueError, match="at least one control"):
        interact.linked_figure(_make)
    with pytest.raises(TypeError, match="value widget"):
        interact.linked_figure(_make, n=3)
    with pytest.raises(TypeError, match="plotly"):
        interact.linked_figure(lambda n: "not a figure", n=slider)
    view = interact.linked_figure(_make, n=slider)
    with pytest.raises(KeyError, match="unknown control"):
        view.set(layer=2)
