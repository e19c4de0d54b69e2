"""``make figures``: run the notebooks, write their figures as paper files and the README gallery.

    $ python -m sparselab.viz.gallery                       # every numbered notebook
    $ python -m sparselab.viz.gallery notebooks/07_hot_cold_neurons.ipynb --formats svg png
    >>> figs = notebook_figures(executed_nb)               # [(name, go.Figure), ...]

For each notebook ``notebooks/NN_name.ipynb`` it writes, under ``--out`` (``figures/``):

- ``NN_name/<k>-<figure-title>.{svg,pdf,png}``: every figure the notebook displays, as
  shown after "run all" (interactive ones at their initial control values; the
  dashboard's figures stacked), through :func:`sparselab.viz.paper.export`;
- ``NN_name/figures.json``: the command, the model, the versions, each figure's files;
- ``NN_name.html``: the notebook's ``nbconvert --to html`` export (plots without a kernel);
- ``gallery/NN_name.png``: a small thumbnail of the notebook's first figure;

and rewrites the README's gallery (between ``<!-- gallery:start -->`` and
``<!-- gallery:end -->``): one thumbnail per notebook, linking to the notebook.
Executing a notebook takes about a minute on 2 cores (the notebooks' own scale).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from sparselab._version import versions
from sparselab.viz import paper as ex
from sparselab.viz.static import PLOTLY_MIMETYPE

__all__ = ["README_END", "README_START", "execute", "gallery_markdown", "main", "notebook_figures",
           "update_readme", "write_notebook_figures"]

README_START = "<!-- gallery:start -->"
README_END = "<!-- gallery:end -->"
THUMBNAIL = (320, 200)
ROOT = Path(__file__).resolve().parents[2]


def _slug(text: str) -> str:
    text = re.sub(r"<[^>]+>", " ", text or "")
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def execute(path: str | Path, timeout: int = 1800):
    """Run a notebook in a fresh kernel (cwd: its folder); return the executed notebook.

    Widget state is not stored: the outputs' static copies (:mod:`sparselab.viz.static`)
    are what viewers without a kernel show.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def notebook_figures(nb: Any) -> list[tuple[str, go.Figure]]:
    """Every figure an executed notebook shows, in order, named ``<k>-<title slug>``."""
    out: list[tuple[str, go.Figure]] = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            spec = output.get("data", {}).get(PLOTLY_MIMETYPE)
            if spec is None:
                continue
            spec = {k: v for k, v in dict(spec).items() if k in ("data", "layout")}
            fig = go.Figure(spec)
            title = fig.layout.title.text or ("dashboard" if isinstance(fig.layout.meta, dict) else "")
            out.append((f"{len(out) + 1}-{_slug(title)}", fig))
    return out


def _stacked(fig: go.Figure) -> int:
    meta = fig.layout.meta
    return int(meta.get("stacked", 1)) if isinstance(meta, dict) else 1


def write_notebook_figures(nb: Any, name: str, out: Path, formats: Sequence[str] = ex.FORMATS,
                           layout: str = "two-column", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export every figure of the executed notebook ``nb`` to ``out/name/`` and write
    ``figures.json`` and ``out/gallery/name.png``; return the JSON written."""
    from tqdm.auto import tqdm

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    figures = notebook_figures(nb)
    records = []
    for fig_name, fig in tqdm(figures, desc=f"{name}: export", leave=False):
        w, h = ex.LAYOUTS[layout]
        n = _stacked(fig)
        paths = ex.export(fig, folder / fig_name, formats=formats, layout=layout,
                          height=int(h * (0.8 * n if n > 1 else 1)))
        records.append({"name": fig_name, "title": fig.layout.title.text, "panels": n,
                        "files": [p.name for p in paths]})
    if figures:
        ex.export(figures[0][1], out / "gallery" / name, formats=("png",), width=THUMBNAIL[0],
                  height=THUMBNAIL[1] * min(_stacked(figures[0][1]), 2), scale=1)
    info = {"notebook": f"notebooks/{name}.ipynb", "figures": records, **(meta or {})}
    (folder / "figures.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


def export_html(nb: Any, path: Path) -> Path:
    """The notebook as ``nbconvert --to html`` writes it (lab template)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def gallery_markdown(names: Sequence[str], out: Path, readme: Path) -> str:
    """The README gallery: one thumbnail per notebook (those that have one), linking to it."""
    rel = out.resolve().relative_to(readme.resolve().parent)
    cells = []
    for name in names:
        if (out / "gallery" / f"{name}.png").is_file():
            title = name.split("_", 1)[-1].replace("_", " ")
            cells.append(f'<a href="notebooks/{name}.ipynb"><img src="{rel.as_posix()}/gallery/{name}.png" '
                         f'width="{THUMBNAIL[0] * 3 // 4}" alt="{name}" title="{name}: {title}"></a>')
    lines = [README_START, "", "Generated by `make figures` (one thumbnail per notebook; click to open it).", "",
             "<p>", *cells, "</p>", "", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    """Replace the gallery block of ``readme`` (appended under a heading if absent)."""
    text = readme.read_text(encoding="utf-8")
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Figure gallery\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparselab.viz.gallery", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9]*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "figures")
    parser.add_argument("--formats", nargs="+", default=list(ex.FORMATS), choices=ex.FORMATS)
    parser.add_argument("--layout", default="two-column", choices=sorted(ex.LAYOUTS))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="leave the README as it is")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    ex.browser_path()  # fail before minutes of execution when no Chromium is there
    from sparselab.models.loading import DEFAULT_MODEL

    command = "python -m sparselab.viz.gallery " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for path in notebooks:
        name = Path(path).stem
        start = time.perf_counter()
        print(f"{name}: executing ...", flush=True)
        nb = execute(path)
        seconds = time.perf_counter() - start
        export_html(nb, args.out / f"{name}.html")
        meta = {"command": command.strip(), "model": f"{DEFAULT_MODEL} (embedded, sl.load_model() default)",
                "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "execute_seconds": round(seconds, 1), "versions": {**versions(), **_plot_versions()},
                "layout": args.layout}
        info = write_notebook_figures(nb, name, args.out, formats=args.formats, layout=args.layout, meta=meta)
        print(f"{name}: {len(info['figures'])} figures in {args.out / name} "
              f"(executed in {seconds:.0f} s, exported in {time.perf_counter() - start - seconds:.0f} s)")
    if not args.no_readme:
        names = sorted(p.name for p in (args.out / "gallery").glob("*.png"))
        update_readme(args.readme, gallery_markdown([Path(n).stem for n in names], args.out, args.readme))
        print(f"gallery written to {args.readme}")
    return 0


def _plot_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for package in ("plotly", "kaleido"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


if __name__ == "__main__":
    sys.exit(main())
