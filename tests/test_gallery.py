"""make figures (sparselab.viz.gallery): figures found in executed notebooks, the README block."""

from __future__ import annotations

import plotly.graph_objects as go

from sparselab.viz import gallery, static


def _nb():
    a = go.Figure(go.Bar(y=[1, 2]), layout={"title": {"text": "Density by layer"}})
    b = go.Figure(go.Scatter(y=[3, 1]))
    both = static.stack({"a": a, "b": b})
    out = lambda fig: {"output_type": "display_data", "data": {static.PLOTLY_MIMETYPE: fig.to_plotly_json()}}  # noqa: E731
    return {"cells": [
        {"cell_type": "markdown", "source": "x"},
        {"cell_type": "code", "outputs": [out(a), {"output_type": "stream", "text": "hi"}]},
        {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {"text/html": "<p>"}}, out(b)]},
        {"cell_type": "code", "outputs": [out(both)]},
    ]}


def test_notebook_figures_in_order_named_by_title():
    figs = gallery.notebook_figures(_nb())
    assert [n for n, _ in figs] == ["1-density-by-layer", "2-figure", "3-dashboard"]
    assert list(figs[0][1].data[0].y) == [1, 2] and len(figs[2][1].data) == 2


def test_gallery_block_links_each_thumbnail_to_its_notebook_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "figures"
    (out / "gallery").mkdir(parents=True)
    (out / "gallery" / "01_explore_sparsity.png").write_bytes(b"png")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\ntext\n")
    block = gallery.gallery_markdown(["01_explore_sparsity", "02_missing"], out, readme)
    assert '<a href="notebooks/01_explore_sparsity.ipynb"><img src="figures/gallery/01_explore_sparsity.png"' in block
    assert "02_missing" not in block
    gallery.update_readme(readme, block)
    gallery.update_readme(readme, block.replace("click", "CLICK"))
    text = readme.read_text()
    assert text.startswith("# x\n\ntext\n") and text.count(gallery.README_START) == 1 and "CLICK" in text
