"""Reading the committed notebooks: their cells, tagged outputs, exercises and solutions.

Shared by tests/test_notebook_outputs.py and tests/test_exercises.py; the rules
they enforce are written down in course/AUTHORING.md.
"""

from __future__ import annotations

import ast
import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COURSE = REPO / "course"
FIGURES = REPO / "figures"
NOTEBOOKS = sorted(COURSE.glob("[0-9][0-9]*.ipynb"))

SOLUTION_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def text(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def tagged_outputs(notebook: dict, key: str):
    """``(cell index, value of the llmlab tag ``key``, output)`` for every output tagged by the package."""
    for index, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            tag = output.get("metadata", {}).get("llmlab", {})
            if key in tag:
                yield index, tag[key], output


def png_bytes(output: dict) -> bytes:
    data = output["data"]["image/png"]
    return base64.b64decode("".join(data) if isinstance(data, list) else data)


def output_text(cell: dict) -> str:
    """Everything a cell printed or raised, as one string."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append("".join(output.get("text", "")))
        elif output.get("output_type") == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}")
        else:
            plain = output.get("data", {}).get("text/plain", "")
            parts.append("".join(plain) if isinstance(plain, list) else plain)
    return "\n".join(parts)


@dataclass
class Exercise:
    """One exercise: its cell, the names it asks for, its check without them, and its solution."""

    notebook: Path
    index: int
    source: str
    answers: list[str]
    check_code: str
    solution: str | None


def _is_stub(node: ast.FunctionDef) -> bool:
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and body[0].value.value is Ellipsis


def _is_blank_answer(node: ast.stmt) -> list[str]:
    """The names a statement leaves unanswered (``x = ...``, ``x: int = ...``, a stub ``def``), else []."""
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis:
        if all(isinstance(t, ast.Name) for t in node.targets):
            return [t.id for t in node.targets]
    if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis \
            and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.FunctionDef) and _is_stub(node):
        return [node.name]
    return []


def split_exercise(source: str) -> tuple[list[str], str]:
    """The answer names of an exercise cell, and the cell without its answer lines (the check)."""
    tree = ast.parse(source)
    answers, kept = [], []
    for node in tree.body:
        names = _is_blank_answer(node)
        if names:
            answers.extend(names)
        else:
            kept.append(node)
    return answers, ast.unparse(ast.Module(body=kept, type_ignores=[]))


def solution_of(cell: dict | None) -> str | None:
    """The one ```python block of a ``solution``-tagged markdown cell, or None."""
    if cell is None or cell.get("cell_type") != "markdown" or "solution" not in tags(cell):
        return None
    blocks = SOLUTION_BLOCK.findall(text(cell))
    return blocks[0] if len(blocks) == 1 else None


def exercises(path: Path) -> list[Exercise]:
    notebook = load(path)
    cells = notebook["cells"]
    found = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code" or "exercise" not in tags(cell):
            continue
        source = text(cell)
        answers, check_code = split_exercise(source)
        following = cells[index + 1] if index + 1 < len(cells) else None
        found.append(Exercise(path, index, source, answers, check_code, solution_of(following)))
    return found
