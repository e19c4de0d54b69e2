"""Static copies of displayed figures (sparselab.viz.static): what an executed notebook
keeps for viewers without a kernel."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from sparselab.testing.browser import figure_outputs
from sparselab.viz import interact, static

PLOTLY = static.PLOTLY_MIMETYPE
WIDGET = "application/vnd.jupyter.widget-view+json"


def _two():
    a = go.Figure(go.Bar(x=["p", "q"], y=[3.0, 5.0]), layout={"title": {"text": "A"}, "height": 300})
    b = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]), layout={"title": {"text": "B"}, "height": 500,
                  "shapes": [{"type": "line", "xref": "paper", "yref": "paper", "x0": 0, "x1": 1,
                              "y0": 0.5, "y1": 0.5}]})
    return a, b


def test_stack_keeps_every_trace_on_its_own_axes_in_bands_by_height():
    a, b = _two()
    one = static.stack({"a": a, "b": b})
    assert [t.type for t in one.data] == ["bar", "heatmap"]
    assert list(one.data[0].y) == [3.0, 5.0] and np.array_equal(np.asarray(one.data[1].z), [[1, 2], [3, 4]])
    assert (one.data[0].xaxis, one.data[0].yaxis) == ("x", "y")
    assert (one.data[1].xaxis, one.data[1].yaxis) == ("x2", "y2")
    top, bottom = one.layout.yaxis.domain, one.layout.yaxis2.domain
    assert top[0] > bottom[1]  # a above b, not overlapping
    assert (top[1] - top[0]) / (bottom[1] - bottom[0]) == pytest.approx(300 / 500)
    assert one.layout.xaxis2.anchor == "y2"
    # b's paper-referenced line at half height sits at half of b's band
    assert one.layout.shapes[0].y0 == pytest.approx(sum(bottom) / 2)
    assert one.layout.meta == {"stacked": 2}
    assert {"<b>A</b>", "<b>B</b>"} <= {x.text for x in one.layout.annotations}


def test_stack_rejects_what_is_not_a_figure():
    with pytest.raises(TypeError, match="not a plotly figure"):
        static.stack({"a": go.Figure(), "b": "nope"})
    with pytest.raises(ValueError, match="no figures"):
        static.stack([])


def test_linked_figure_output_carries_widget_plotly_json_then_html_of_the_current_state(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append(obj))
    view = interact.linked_figure(lambda n: go.Figure(go.Bar(y=list(range(n)))),
                                  n=widgets.IntSlider(value=3, min=1, max=9))
    view.set(n=5)
    view._ipython_display_()
    first, second = shown
    assert WIDGET in first and list(first[PLOTLY]["data"][0]["y"]) == [0, 1, 2, 3, 4]
    assert "text/html" not in first  # else nbconvert would show the figure twice
    html = second["text/html"]
    assert 'class="sparselab-static"' in html and ":has(.widget-container" in html and "Plotly.newPlot" in html
    assert figure_outputs({"cells": [{"outputs": [{"data": first}, {"data": second}]}]}) == [1]


def test_keep_stacks_every_figure_widget_of_a_container():
    a, b = _two()
    box = widgets.VBox([widgets.IntSlider(), widgets.HBox([go.FigureWidget(a)]), go.FigureWidget(b)])
    bundle = static.keep(box)._repr_mimebundle_()
    fig = bundle[PLOTLY]
    assert [t["type"] for t in fig["data"]] == ["bar", "heatmap"] and fig["layout"]["meta"] == {"stacked": 2}
    with pytest.raises(ValueError, match="no go.FigureWidget"):
        static.keep(widgets.VBox([widgets.IntSlider()]))


def test_plotlyjs_is_inlined_once_then_reused():
    static.reset_plotlyjs()
    a, b = _two()
    first, second = static.static_bundle(a)["text/html"], static.static_bundle(b)["text/html"]
    assert len(first) > 1_000_000 > len(second)
    assert "Plotly.newPlot" in second


def test_install_adds_html_to_the_automatic_renderer_only(monkeypatch):
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    static.install()
    assert pio.renderers.default == "plotly_mimetype+sparselab"
    bundle = pio.renderers._build_mime_bundle(go.Figure(go.Bar(y=[1])).to_dict(), renderers_string=None)
    assert {PLOTLY, "text/html"} <= set(bundle)
    monkeypatch.setattr(pio.renderers, "default", "browser")
    static.install()
    assert pio.renderers.default == "browser"


def test_figure_outputs_counts_figures_not_progress_bars():
    a, b = _two()
    cells = [
        {"outputs": [{"data": {"application/vnd.jupyter.widget-view+json": {}, "text/plain": " 50%|##  | 1/2"}}]},
        {"outputs": [{"data": {PLOTLY: static.stack([a, b]).to_plotly_json()}}, {"data": {"text/html": "x"}}]},
        {"outputs": [{"data": {WIDGET: {}, "text/plain": "FigureWidget({'data': []})"}}]},
    ]
    assert figure_outputs({"cells": cells}) == [0, 2, 1]
