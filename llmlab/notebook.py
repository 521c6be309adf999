"""Helpers the course notebooks share: show the package's source, save figures.

Taught in notebook 00: every notebook builds a concept by hand, then calls
``show(...)`` to read the package's real implementation, checks the two agree,
and saves its figures with ``save_figure``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

FIGURES_ENV = "LLMLAB_FIGURES_DIR"
"""Environment variable that redirects saved figures (the tests point it at a temp dir)."""


def source(obj: Any) -> str:
    """The source code of a package object (function, class, method or module)."""
    try:
        return inspect.getsource(obj)
    except (TypeError, OSError) as err:
        raise TypeError(
            f"cannot show the source of {obj!r}: pass a function, class, method or module "
            "defined in Python (not a built-in or an instance)."
        ) from err


def show(obj: Any):
    """Render ``obj``'s source with syntax highlighting in a notebook.

    Outside IPython it returns the plain source string, which prints as is.
    """
    text = source(obj)
    try:
        from IPython.display import Code
    except ImportError:  # plain Python without IPython
        return text
    return Code(text, language="python")


def figures_dir() -> Path:
    """Where figures go: ``$LLMLAB_FIGURES_DIR``, else ``figures/`` at the course's root.

    The course's root is the nearest folder, from the working directory up, that
    holds both ``course/`` and ``figures/``; failing that, ``./figures``.
    """
    override = os.environ.get(FIGURES_ENV)
    if override:
        path = Path(override)
    else:
        here = Path.cwd().resolve()
        path = here / "figures"
        for folder in (here, *here.parents):
            if (folder / "course").is_dir() and (folder / "figures").is_dir():
                path = folder / "figures"
                break
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str, dpi: int = 110) -> None:
    """Save a matplotlib figure as ``<figures>/<name>.png`` (see :func:`figures_dir`).

    The PNG carries no timestamp or version metadata, so re-running a notebook
    rewrites identical bytes when the picture is unchanged.
    """
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"figure name {name!r} must be a plain file name such as '01_tokens'.")
    path = figures_dir() / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})


def check(name: str, got: Any, expected: Any, *, tol: float = 0.0, hint: str = "") -> None:
    """A self-checking exercise: print ✓ when ``got`` matches ``expected``, else raise with a hint.

    Numbers match within ``tol`` (relative); anything else must be equal.
    """
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = abs(got - expected) <= tol * max(abs(expected), 1e-12) if tol else got == expected
    else:
        ok = got == expected
    if not ok:
        message = f"✗ {name}: got {got!r}, expected {expected!r}."
        raise AssertionError(message + (f" Hint: {hint}" if hint else ""))
    print(f"✓ {name}")
