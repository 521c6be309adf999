"""What the committed notebooks show is true to the package and to figures/ (see course/AUTHORING.md).

- every ``show(...)`` listing equals the package's current source;
- every ``figures/*.png`` is, byte for byte, the image its notebook displays, and is not blank;
- every notebook ends with a Korean 요약 and names future notebooks by number and title;
- README's course map lists exactly the notebooks in ``course/``;
- no committed notebook carries a dead widget (the explorers leave a static preview instead).
"""

from __future__ import annotations

import io
import re

import pytest

from notebook_files import FIGURES, NOTEBOOKS, REPO, load, png_bytes, tagged_outputs, text

FUTURE = {
    11: "serving engine",
    12: "tensor parallelism",
    13: "Triton kernels",
    14: "real pretrained checkpoints",
    15: "serving and its metrics",
    16: "making it fast",
    17: "capstone",
}
"""The course from notebook 11 on, as DESIGN.md and the issues number it."""

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_listings_are_the_current_source(path):
    from llmlab.notebook import resolve_address, source

    notebook = load(path)
    shown = {index for index, _, _ in tagged_outputs(notebook, "source_of")}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code" and re.search(r"(?<![\w.])show\(", text(cell)):
            assert index in shown, f"{path.name} cell {index} calls show() but its committed output is untagged: re-execute"
    for index, address, output in tagged_outputs(notebook, "source_of"):
        try:
            current = source(resolve_address(address))
        except (ImportError, AttributeError) as err:
            pytest.fail(f"{path.name} cell {index} shows {address}, which no longer exists ({err})")
        committed = output["data"]["text/plain"]
        committed = "".join(committed) if isinstance(committed, list) else committed
        assert committed == current, (
            f"{path.name} cell {index} shows an old {address}: re-execute the notebook (make notebooks)")


def _figures_drawn():
    drawn: dict[str, list[tuple[str, int, bytes]]] = {}
    for path in NOTEBOOKS:
        for index, name, output in tagged_outputs(load(path), "figure"):
            drawn.setdefault(name, []).append((path.name, index, png_bytes(output)))
    return drawn


def test_every_figure_file_is_what_its_notebook_shows():
    drawn = _figures_drawn()
    files = {p.stem for p in FIGURES.glob("*.png")}
    assert files, "figures/ is empty"
    orphans = sorted(files - set(drawn))
    assert not orphans, f"figures no notebook draws (delete them or re-execute): {orphans}"
    missing = sorted(set(drawn) - files)
    assert not missing, f"figures a notebook draws but figures/ lacks (re-execute the notebook): {missing}"
    for name, places in drawn.items():
        assert len(places) == 1, f"figure {name!r} is drawn in more than one place: {[p[:2] for p in places]}"
        notebook, index, shown = places[0]
        assert (FIGURES / f"{name}.png").read_bytes() == shown, (
            f"figures/{name}.png differs from what {notebook} cell {index} shows: re-execute the notebook")


def test_no_figure_is_blank():
    import matplotlib.image as mpimg

    for path in sorted(FIGURES.glob("*.png")):
        pixels = mpimg.imread(io.BytesIO(path.read_bytes()), format="png")
        rgb = pixels[..., :3]
        assert rgb.std() > 0.02, f"{path.name} is (nearly) blank: pixel std {rgb.std():.4f}"


def test_readme_figures_exist():
    for name in re.findall(r"figures/([\w.-]+\.png)", (REPO / "README.md").read_text(encoding="utf-8")):
        assert (FIGURES / name).is_file(), f"README.md shows figures/{name}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_ends_with_a_korean_summary(path):
    cells = load(path)["cells"]
    tail = [text(c) for c in cells[-4:] if c["cell_type"] == "markdown"]
    summaries = [t for t in tail if re.search(r"^#+ .*요약", t, re.MULTILINE)]
    assert summaries, f"{path.name}: no '요약' heading among its last cells"
    hangul_lines = [line for line in summaries[0].splitlines() if len(HANGUL.findall(line)) >= 5]
    assert len(hangul_lines) >= 3, f"{path.name}: the 요약 needs at least three lines in Korean"


_MENTION = re.compile(r"(?:[Nn]otebooks?|노트북)\s+(1[1-7])\b")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_future_notebooks_are_named_by_number_and_title(path):
    problems = []
    for index, cell in enumerate(load(path)["cells"]):
        source = text(cell)
        for match in _MENTION.finditer(source):
            number = int(match.group(1))
            after = " ".join(source[match.end(): match.end() + 80].split()).lower()
            if FUTURE[number].lower() not in after:
                problems.append(f"cell {index}: {source[match.start(): match.end() + 40]!r} "
                                f"should name '{FUTURE[number]}'")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_readme_course_map_lists_every_notebook():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\(course/(\d\d\w*\.ipynb)\)", readme))
    present = {p.name for p in NOTEBOOKS}
    assert linked == present, f"README course map: missing {sorted(present - linked)}, stale {sorted(linked - present)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_dead_widgets_are_committed(path):
    notebook = load(path)
    assert "widgets" not in notebook.get("metadata", {}), (
        f"{path.name} stores widget state: strip it (python -m llmlab.strip_widgets)")
    for index, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            assert WIDGET_MIME not in output.get("data", {}), (
                f"{path.name} cell {index} keeps a widget that cannot run unexecuted: strip it")
