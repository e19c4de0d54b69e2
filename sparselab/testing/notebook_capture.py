"""A pytest plugin: keep the outputs nbval produced, so that tests can look at executed notebooks.

    # tests/conftest.py
    pytest_plugins = ("sparselab.testing.notebook_capture",)

    @pytest.mark.after_notebooks                   # runs after every notebook cell
    def test_x(executed_notebooks): ...            # {path: executed nbformat notebook}

``pytest tests --nbval-lax notebooks`` runs every notebook once; re-running them for a
test that needs their outputs (the HTML export check) would double that time. Tests
marked ``after_notebooks`` are moved to the end of the session; ``executed_notebooks``
holds each notebook whose every code cell nbval ran and passed, with those outputs.
Without nbval in the session it is empty (the test decides what to do then).
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest

_KEY = pytest.StashKey[dict]()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "after_notebooks: run after the notebooks nbval executes")
    config.stash[_KEY] = {}


def pytest_collection_modifyitems(session, config, items) -> None:
    late = [i for i in items if i.get_closest_marker("after_notebooks")]
    if late:
        items[:] = [i for i in items if not i.get_closest_marker("after_notebooks")] + late


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    outs = getattr(item, "test_outputs", None)
    nb = getattr(item.parent, "nb", None)
    if call.when == "call" and nb is not None and hasattr(item, "cell_num"):
        runs = item.config.stash[_KEY].setdefault(str(item.parent.path), {"nb": nb, "outputs": {}, "failed": False})
        if report.passed and outs is not None:
            runs["outputs"][item.cell_num] = outs
        else:
            runs["failed"] = True
    return report


@pytest.fixture(scope="session")
def executed_notebooks(request) -> dict[Path, object]:
    """``{notebook path: executed notebook}`` of the notebooks nbval ran completely."""
    done = {}
    for path, runs in request.config.stash[_KEY].items():
        nb = copy.deepcopy(runs["nb"])
        code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        if runs["failed"] or set(runs["outputs"]) != set(range(len(code))):
            continue
        for k, i in enumerate(code):
            nb.cells[i].outputs = [nbformat.from_dict(dict(o)) for o in runs["outputs"][k]]
        done[Path(path)] = nb
    return done
