"""Exercises ship unanswered; each check passes with its solution and fails with a wrong answer.

The static tests read the committed notebooks. The kernel test runs each whole notebook
(fast mode) and, right after every exercise cell, runs in the same kernel: the
solution, then the cell without its answer lines (must print ✓); then, for each
answer in turn, the same with that answer made wrong (must raise AssertionError);
then the exercise cell again, so the cells after it see what they see shipped.
See course/AUTHORING.md.

The kernel test is marked ``notebook_run``: ``make test`` runs it as its second pass, on
PyTorch's portable kernels with one thread (``make test-portable``), so that this one run
both proves the exercises and executes every notebook again as another CPU would — nbval
has executed them once already in the first pass.
"""

from __future__ import annotations

import pytest

from notebook_files import COURSE, NOTEBOOKS, exercises, load, output_text, tags, text

NOT_ANSWERED = "not answered yet"

WRONG_ANSWER = '''
def _llmlab_wrong(value):
    """A wrong answer of the same kind as ``value`` (numbers x1.5+1, flipped bools, one more item...)."""
    import functools
    import numpy as np
    import torch
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 1.5 + 1
    if isinstance(value, str):
        return value + " (wrong)"
    if isinstance(value, torch.Tensor):
        return ~value if value.dtype == torch.bool else value + 1
    if isinstance(value, np.ndarray):
        return value + 1
    if isinstance(value, dict):
        return {**value, "_wrong": None}
    if isinstance(value, (list, tuple)):
        return type(value)([*value, value[-1] if value else 0])
    if callable(value):
        @functools.wraps(value)
        def wrong(*args, **kwargs):
            return _llmlab_wrong(value(*args, **kwargs))
        return wrong
    raise TypeError(f"no wrong answer for {type(value).__name__}")
'''


def _ids(paths):
    return [p.stem for p in paths]


WITH_EXERCISES = [p for p in NOTEBOOKS if exercises(p)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_every_notebook_has_exercises(path):
    assert exercises(path), f"{path.name} has no cell tagged 'exercise' (see course/AUTHORING.md)"


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=_ids(WITH_EXERCISES))
def test_exercises_ship_unanswered_with_a_hidden_solution(path):
    cells = load(path)["cells"]
    for exercise in exercises(path):
        where = f"{path.name} cell {exercise.index}"
        assert exercise.answers, f"{where}: an exercise needs at least one `name = ...` or stub `def`"
        assert "NBVAL_CHECK_OUTPUT" not in exercise.source, f"{where}: exercise outputs are not compared"
        assert exercise.solution is not None, (
            f"{where}: the next cell must be a markdown cell tagged 'solution' with one ```python block")
        solution_cell = text(cells[exercise.index + 1])
        assert "<details>" in solution_cell and "</details>" in solution_cell, (
            f"{where}: the solution must be collapsed in <details> (one click away)")
        printed = output_text(cells[exercise.index])
        assert NOT_ANSWERED in printed, f"{where}: the committed run must say '{NOT_ANSWERED}', got {printed!r}"
        assert "Error" not in printed and "✓" not in printed, f"{where}: shipped answered or failing: {printed!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_answers_left_in_plain_sight(path):
    """A cell that asks for 'your answer' is an exercise cell (tagged), so the test above sees it."""
    for index, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] == "code" and "exercise" not in tags(cell):
            assert "your answer" not in text(cell) and "✏️" not in text(cell), (
                f"{path.name} cell {index}: looks like an exercise but is not tagged 'exercise'")


def _run(client, code: str, index: int):
    import nbformat

    cell = nbformat.v4.new_code_cell(code)
    client.execute_cell(cell, index, store_history=False)
    return cell


@pytest.mark.slow
@pytest.mark.notebook_run
@pytest.mark.parametrize("path", WITH_EXERCISES, ids=_ids(WITH_EXERCISES))
def test_checks_pass_with_the_solution_and_fail_with_a_wrong_answer(path):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    found = {e.index: e for e in exercises(path)}
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(COURSE)}})
    failures = []
    with client.setup_kernel():
        _run(client, WRONG_ANSWER, -1)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            client.execute_cell(cell, index)
            exercise = found.get(index)
            if exercise is None:
                continue
            where = f"{path.name} cell {index}"
            shipped = output_text(cell)
            if NOT_ANSWERED not in shipped:
                failures.append(f"{where}: unanswered, it printed {shipped!r} instead of '{NOT_ANSWERED}'")
            try:
                solved = _run(client, exercise.solution + "\n" + exercise.check_code, index)
            except CellExecutionError as err:
                failures.append(f"{where}: the check fails with its own solution: {str(err)[-400:]}")
                continue
            solved_text = output_text(solved)
            if "✓" not in solved_text or NOT_ANSWERED in solved_text:
                failures.append(f"{where}: with the solution the check printed {solved_text!r}, no ✓")
            for name in exercise.answers:
                mutate = f"{exercise.solution}\n{name} = _llmlab_wrong({name})\n{exercise.check_code}"
                try:
                    wrong = _run(client, mutate, index)
                except CellExecutionError as err:
                    if "AssertionError" not in str(err):
                        failures.append(f"{where}: a wrong {name!r} raised something else: {str(err)[-300:]}")
                    continue
                failures.append(f"{where}: a wrong {name!r} passed the check: {output_text(wrong)!r}")
            _run(client, cell.source, index)  # the shipped (unanswered) state again, for the cells after it
    assert not failures, "\n".join(failures)
