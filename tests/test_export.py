"""Paper export (sparselab.viz.paper): files of the requested size whose drawn data are
the figure's data. Needs Debian's Chromium (kaleido drives it); one browser start per call."""

from __future__ import annotations

import re
import struct

import plotly.graph_objects as go
import pytest

from sparselab.testing.browser import chromium_path
from sparselab.viz import paper as ex

needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="Debian chromium not installed")
HEIGHTS = [2.0, 7.0, 3.5, 5.0]


def _bars():
    return go.Figure(go.Bar(x=["a", "b", "c", "d"], y=HEIGHTS), layout={"title": {"text": "bars"}})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    if chromium_path() is None:
        pytest.skip("Debian chromium not installed")
    stem = tmp_path_factory.mktemp("export") / "sub" / "bars"
    return ex.export(_bars(), stem, layout="two-column", scale=2)


@needs_chromium
def test_export_writes_every_format_at_the_requested_size(written):
    w, h = ex.LAYOUTS["two-column"]
    assert [p.suffix for p in written] == [".svg", ".pdf", ".png"]
    assert all(p.stat().st_size > 1000 for p in written)
    svg, pdf, png = (p.read_bytes() for p in written)
    assert re.search(rb'<svg[^>]* width="%d" height="%d"' % (w, h), svg)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (2 * w, 2 * h)
    assert pdf.startswith(b"%PDF")
    box = [float(v) for v in re.search(rb"/MediaBox \[([^\]]+)\]", pdf).group(1).split()]
    assert box[2] == pytest.approx(w * 0.75, abs=1.5) and box[3] == pytest.approx(h * 0.75, abs=1.5)


@needs_chromium
def test_exported_svg_bars_are_the_figures_heights(written):
    svg = written[0].read_text()
    # each bar is drawn as M x,base V top H x2 V base Z (pixels, y downwards)
    bars = re.findall(r'<g class="point"><path d="M[\d.]+,([\d.]+)V([\d.]+)H', svg)
    drawn = [float(base) - float(top) for base, top in bars]
    assert len(drawn) == len(HEIGHTS)
    scale = drawn[0] / HEIGHTS[0]
    assert drawn == pytest.approx([v * scale for v in HEIGHTS], abs=0.05)
    # the paper style: Okabe-Ito's first colour, no modebar in a file
    assert "rgb(0, 114, 178)" in svg and "modebar" not in svg


def test_paper_style_copies_and_sizes():
    fig = _bars()
    paper = ex.paper_style(fig, "one-column")
    assert (paper.layout.width, paper.layout.height) == ex.LAYOUTS["one-column"]
    assert list(paper.layout.colorway) == list(ex.PALETTE) and paper.layout.font.size == ex.FONT["size"]
    assert fig.layout.width is None  # the original is untouched
    with pytest.raises(ValueError, match="layout must be one of"):
        ex.paper_style(fig, "three-column")


def test_export_checks_arguments_before_writing(tmp_path):
    with pytest.raises(ValueError, match="formats must be among"):
        ex.export(_bars(), tmp_path / "x", formats=("jpg",))
    with pytest.raises(TypeError, match="plotly figure"):
        ex.export({"data": []}, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_missing_chromium_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    monkeypatch.setattr(ex, "_DEBIAN_CHROMIUM", str(tmp_path / "none"))
    monkeypatch.setattr(ex.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install chromium"):
        ex.export(_bars(), tmp_path / "x")
    assert not (tmp_path / "x.svg").exists()
