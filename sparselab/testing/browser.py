"""Drive a real JupyterLab in headless Chromium (Debian's, never a downloaded one).

    >>> with jupyterlab_server(notebook_dir) as url, chromium_page() as (page, errors):
    ...     open_and_run(page, url, "01_explore_sparsity.ipynb")

Used by the browser test and by ``experiments/dashboard_screenshot.py``. The server
listens on 127.0.0.1 only, without a token; Chromium runs with the flags this machine's
closed network needs (no background networking, no component updates).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Debian's Chromium, or None when it is not installed."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab_server(notebook_dir: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start ``jupyter lab`` on 127.0.0.1 for ``notebook_dir``; yields its base URL."""
    port = _free_port()
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    runtime = tempfile.mkdtemp(prefix="sparselab-jlab-")
    env["JUPYTER_RUNTIME_DIR"] = runtime
    log = open(Path(runtime) / "server.log", "w")  # noqa: SIM115 - closed in finally
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
        "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={notebook_dir}",
        "--LabApp.expose_app_in_browser=True", "--allow-root",
        "--LabApp.extension_manager=readonly",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebook_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    text = (Path(runtime) / "server.log").read_text()[-3000:]
                    raise RuntimeError(f"JupyterLab did not start:\n{text}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(runtime, ignore_errors=True)


def _console_error(msg, errors: list[str]) -> None:
    """Keep console errors, except failed loads of resources outside this machine.

    The test machine has no internet; a page asset on an external host (a font, the
    news feed) fails to load there without saying anything about sparselab's page.
    """
    if msg.type != "error":
        return
    url = (msg.location or {}).get("url", "") or ""
    external = url.startswith("http") and not url.startswith(("http://127.0.0.1", "http://localhost"))
    if external and "Failed to load resource" in msg.text:
        return
    errors.append(f"console.error: {msg.text} @ {url}")


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    """A Playwright page in headless Debian Chromium; yields ``(page, errors)``.

    ``errors`` collects uncaught page exceptions and console errors as strings.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("Debian's chromium is not installed (apt-get install chromium)")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on("console", lambda msg: _console_error(msg, errors))
            yield page, errors
        finally:
            browser.close()


def run_all_cells(page, url: str, notebook: str, timeout_ms: int = 300_000) -> None:
    """Open ``notebook`` in JupyterLab, run every cell and wait until the kernel is idle."""
    page.goto(f"{url}/lab/tree/{notebook}", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=60_000)
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    _dismiss_news_toast(page)
    # wait for the kernel to be ready before running
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   return w && w.sessionContext && w.sessionContext.session &&
                          w.sessionContext.session.kernel &&
                          w.sessionContext.session.kernel.status === 'idle'; }""",
        timeout=120_000,
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # all cells executed: no cell shows the '[*]' busy prompt and the kernel is idle
    page.wait_for_timeout(1000)
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   const busy = [...document.querySelectorAll('.jp-InputPrompt')]
                       .some(e => e.textContent.includes('*'));
                   return !busy && w.sessionContext.session.kernel.status === 'idle'; }""",
        timeout=timeout_ms,
        polling=500,
    )


def _dismiss_news_toast(page) -> None:
    """Answer JupyterLab's "notified about news?" toast (it would cover screenshots)."""
    button = page.locator(".jp-toast-button", has_text="No")
    with contextlib.suppress(Exception):
        button.first.click(timeout=5_000)


def slider_handle(page, label: str):
    """The noUiSlider handle of the ipywidgets slider whose description contains ``label``."""
    slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=label))
    return slider.first.locator(".noUi-handle").first


def cell_errors(page) -> list[str]:
    """Text of every error output shown in the notebook."""
    return page.eval_on_selector_all(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
        ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']",
        "els => els.map(e => e.textContent.slice(0, 2000))",
    )


# Plotly graphs drawn by live widgets and figures, not the static copies of widgets'
# figures (sparselab.viz.static), which a live widget hides
LIVE_PLOTS = ".js-plotly-plot:not(.sparselab-static .js-plotly-plot)"


def plotly_z(page, index: int = 0):
    """The ``z`` data of the first heatmap trace of the ``index``-th Plotly graph shown
    (among :data:`LIVE_PLOTS`)."""
    return page.evaluate(
        """(i) => { const gds = [...document.querySelectorAll('.js-plotly-plot:not(.sparselab-static .js-plotly-plot)')];
                    const gd = gds[i]; if (!gd || !gd.data) return null;
                    const t = gd.data.find(t => t.type === 'heatmap');
                    return t ? JSON.stringify(t.z) : null; }""",
        index,
    )


PLOTS_BY_CELL_JS = """() => [...document.querySelectorAll('.jp-Cell')].map(cell =>
    [...cell.querySelectorAll('.js-plotly-plot')].filter(gd =>
        gd.offsetParent !== null && gd.data && gd.data.some(t =>
            ['x', 'y', 'z', 'values'].some(k => t[k] && t[k].length > 0))).length)"""


def figure_outputs(notebook: dict) -> list[int]:
    """Per cell of an executed notebook (JSON dict): how many figure outputs it holds.

    A figure output is one carrying a Plotly figure (``application/vnd.plotly.v1+json``;
    a stack of several counts once per figure) or an ipywidgets view holding a
    ``FigureWidget`` (not progress bars).
    """
    counts = []
    for cell in notebook["cells"]:
        n = 0
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            fig = data.get("application/vnd.plotly.v1+json")
            if fig is not None:  # a stack of several figures says how many (sparselab.viz.static)
                meta = fig.get("layout", {}).get("meta")
                n += int(meta.get("stacked", 1)) if isinstance(meta, dict) else 1
            elif "application/vnd.jupyter.widget-view+json" in data and "FigureWidget" in str(
                    data.get("text/plain", "")):  # a figure widget without a static copy
                n += 1
        counts.append(n)
    return counts


def rendered_plots_by_cell(page, path: Path, timeout_ms: int = 60_000) -> list[int]:
    """Open an HTML file (e.g. a ``nbconvert --to html`` export) and count, per notebook
    cell, the Plotly plots that are visible and hold data."""
    page.goto(Path(path).resolve().as_uri(), wait_until="load", timeout=timeout_ms)
    page.wait_for_timeout(500)
    return page.evaluate(PLOTS_BY_CELL_JS)
