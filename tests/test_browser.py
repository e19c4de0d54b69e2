"""A real JupyterLab in headless Debian Chromium: run notebook 01, move the dashboard's
threshold slider, and check that the heatmap changed and the page logged no errors.

The screenshot is kept as a test artefact in ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sparselab.testing.browser import (
    LIVE_PLOTS,
    cell_errors,
    chromium_page,
    chromium_path,
    jupyterlab_server,
    plotly_z,
    run_all_cells,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_explore_sparsity.ipynb"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="Debian chromium not installed"),
]


def _heatmap_index(page) -> int:
    """Index (among all Plotly graphs on the page) of the dashboard's first heatmap."""
    return page.evaluate(HEATMAP_INDEX_JS)


HEATMAP_INDEX_JS = f"""() => [...document.querySelectorAll('{LIVE_PLOTS}')]
                 .findIndex(gd => gd.data && gd.data.some(t => t.type === 'heatmap'))"""


def test_dashboard_slider_updates_heatmap(tmp_path):
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK)
    ARTIFACTS.mkdir(exist_ok=True)
    with jupyterlab_server(tmp_path) as url, chromium_page(width=1400, height=2200) as (page, errors):
        run_all_cells(page, url, NOTEBOOK)
        assert cell_errors(page) == [], "a notebook cell raised in the browser"

        page.wait_for_selector(".sparselab-value .noUi-handle", timeout=60_000)
        # the controls can render before the plots (plotly loads asynchronously): wait
        page.wait_for_function(f"() => ({HEATMAP_INDEX_JS})() >= 0", timeout=60_000)
        index = _heatmap_index(page)
        assert index >= 0, "the dashboard shows no heatmap"
        before = plotly_z(page, index)

        handle = page.locator(".sparselab-value .noUi-handle").first
        handle.scroll_into_view_if_needed()
        handle.focus()
        for _ in range(8):  # each key press is one slider step towards a larger value
            page.keyboard.press("ArrowRight")
        page.wait_for_function(
            f"""([i, before]) => {{ const gd = [...document.querySelectorAll('{LIVE_PLOTS}')][i];
                   const t = gd && gd.data && gd.data.find(t => t.type === 'heatmap');
                   return t && JSON.stringify(t.z) !== before; }}""",
            arg=[index, before],
            timeout=60_000,
        )
        after = plotly_z(page, index)
        # the slider fires one update per step; wait until the last one is drawn, so the
        # screenshot shows the state the slider reads (status line names the rule's value)
        readout = float(page.locator(".sparselab-value .widget-readout").first.inner_text())
        page.wait_for_function(
            "(label) => document.body.innerText.includes(label)",
            arg=f"density={readout:g}",
            timeout=60_000,
        )
        dashboard = page.locator(".jp-OutputArea-output", has=page.locator(".sparselab-value"))
        dashboard.first.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"), full_page=False)

        (ARTIFACTS / "browser-errors.txt").write_text("\n".join(errors))

    assert after != before
    assert errors == [], f"the page logged JavaScript errors: {errors}"


# ------------------------------------------------------------------ HTML exports

@pytest.fixture(scope="session")
def browser_page():
    """One headless Chromium page for the session: ``(page, errors)``."""
    with chromium_page(width=1200, height=900) as pair:
        yield pair


@pytest.mark.after_notebooks
def test_html_export_of_every_executed_notebook_shows_every_figure(executed_notebooks, browser_page, tmp_path):
    """Every figure output of every numbered notebook is a rendered Plotly plot with data
    in its ``nbconvert --to html`` export, opened without a kernel.

    The notebooks are the ones nbval ran in this session (``make test`` runs them all);
    run alone, this test executes notebook 01 itself.
    """
    from nbconvert import HTMLExporter

    from sparselab.testing.browser import figure_outputs, rendered_plots_by_cell
    from sparselab.viz.gallery import execute

    notebooks = {p: nb for p, nb in executed_notebooks.items() if p.name[:1].isdigit()}
    if not notebooks:
        notebooks = {ROOT / "notebooks" / NOTEBOOK: execute(ROOT / "notebooks" / NOTEBOOK)}
    page, errors = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    problems = {}
    for path, nb in sorted(notebooks.items()):
        expected = figure_outputs(nb)
        assert sum(expected) > 0, f"{path.name} shows no figure"
        body, _ = HTMLExporter().from_notebook_node(nb)
        html = tmp_path / f"{path.stem}.html"
        html.write_text(body, encoding="utf-8")
        seen = rendered_plots_by_cell(page, html)
        assert len(seen) == len(nb.cells), f"{path.name}: {len(seen)} cells in the page, {len(nb.cells)} in the notebook"
        short = {i: (want, got) for i, (want, got) in enumerate(zip(expected, seen, strict=True)) if got < want}
        if short:
            problems[path.name] = short  # cell index: (figure outputs, rendered plots with data)
            page.screenshot(path=str(ARTIFACTS / f"export-{path.stem}.png"), full_page=True)
    assert problems == {}, f"figures missing from HTML exports: {problems}"
    assert errors == [], f"the exported pages logged errors: {errors}"
