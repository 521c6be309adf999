"""Remove live-widget outputs and saved widget state from notebooks, keeping static previews.

A widget output only lives while its kernel runs.  Committed to git it shows,
when the notebook is opened without running it, as ``VBox(children=...`` text,
as "Error displaying widget", or (with the saved state) as a dead snapshot.
The explorers in :mod:`llmlab.widgets` display a static HTML preview before
their live widget; this keeps that preview and drops the rest::

    python -m llmlab.strip_widgets course/*.ipynb          # rewrite in place
    python -m llmlab.strip_widgets --check course/*.ipynb  # exit 1 if any would change

What it does, per notebook:

- removes the ``application/vnd.jupyter.widget-view+json`` entry of every output;
- drops an output that is then empty, or holds only the widget's class repr
  (``VBox(children=...``), or that an explorer marked as live-only (output
  metadata ``{"llmlab": {"live_widget": ...}}``); other outputs keep their
  remaining representations (a tqdm bar keeps its ``text/plain`` progress line);
- removes the notebook-level ``"widgets"`` metadata (the saved widget state).

A notebook that has nothing to strip is not rewritten.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_KEY = "widgets"

_WIDGET_REPR = re.compile(r"^[A-Za-z_]\w*\(\w+=")
"""A widget's default ``text/plain``: its class's repr, e.g. ``VBox(children=(Textarea(...``."""


def _is_live_only(output) -> bool:
    meta = output.get("metadata") or {}
    marker = meta.get("llmlab") if isinstance(meta, dict) else None
    return isinstance(marker, dict) and "live_widget" in marker


def _only_widget_repr(data) -> bool:
    text = data.get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else text
    return set(data) == {"text/plain"} and bool(_WIDGET_REPR.match(text))


def strip_notebook(nb) -> int:
    """Strip widget views and widget state from ``nb`` (a dict or ``NotebookNode``) in place.

    Returns the number of changes: outputs changed or dropped, plus one when the
    ``"widgets"`` metadata was removed.
    """
    changes = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data")
            if output.get("output_type") in ("display_data", "execute_result") and data and WIDGET_MIME in data:
                changes += 1
                del data[WIDGET_MIME]
                if not data or _is_live_only(output) or _only_widget_repr(data):
                    continue
            elif _is_live_only(output):
                changes += 1
                continue
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    metadata = nb.get("metadata", {})
    if WIDGET_STATE_KEY in metadata:
        del metadata[WIDGET_STATE_KEY]
        changes += 1
    return changes


def strip_file(path: str | Path, *, write: bool = True) -> int:
    """Strip one ``.ipynb`` file (rewritten only when something changed); returns the number of changes."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    changes = strip_notebook(nb)
    if changes and write:
        nbformat.validate(nb)
        tmp = path.with_name(path.name + ".tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmlab.strip_widgets", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help=".ipynb files to strip in place")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook has widgets")
    args = parser.parse_args(argv)
    dirty = 0
    for path in args.notebooks:
        changes = strip_file(path, write=not args.check)
        if changes:
            dirty += 1
            verb = "has" if args.check else "stripped"
            print(f"{path}: {verb} {changes} widget item(s) (outputs or saved widget state)")
    if args.check and dirty:
        print(f"{dirty} notebook(s) carry live widgets; run: python -m llmlab.strip_widgets <notebooks>")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
