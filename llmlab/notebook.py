"""Helpers the course notebooks share: show the package's source, save figures, check exercises.

Taught in notebook 00: every notebook builds a concept by hand, then calls
``show(...)`` to read the package's real implementation, checks the two agree,
and saves its figures with ``save_figure``. Exercises ship unanswered (``...``)
and call ``check`` or ``check_function``, which say "not answered yet" until
the learner fills the answer in.

Three guards keep what a notebook shows honest, and the tests rely on them:

- ``show`` tags its output with the object it shows, so a test can compare a
  committed notebook's listing with the package's current source;
- ``save_figure`` displays exactly the bytes it writes to ``figures/`` (tagged
  with the file name), so a test can compare the two byte for byte;
- ``save_figure`` refuses a figure whose text would be smaller than 9 pt on a
  screen or projector (see :data:`MIN_SCREEN_PX`).
"""

from __future__ import annotations

import inspect
import io
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FIGURES_ENV = "LLMLAB_FIGURES_DIR"
"""Environment variable that redirects saved figures (the tests point it at a temp dir)."""

OUTPUT_TAG = "llmlab"
"""Key of the metadata that ``show`` and ``save_figure`` attach to their notebook outputs."""

DISPLAY_WIDTH_PX = 1000
"""Widest a notebook shows an image, in CSS pixels: JupyterLab on a 1280-px projector, sidebar closed.

Wider images are scaled down to fit, and their text with them.
"""

MIN_SCREEN_PX = 12.0
"""Smallest text a figure may carry, in CSS pixels as shown: 9 pt at 96 px per inch."""


# --- show: the package's source, rendered ---------------------------------------------------


def source(obj: Any) -> str:
    """The source code of a package object (function, class, method or module)."""
    try:
        return inspect.getsource(obj)
    except (TypeError, OSError) as err:
        raise TypeError(
            f"cannot show the source of {obj!r}: pass a function, class, method or module "
            "defined in Python (not a built-in or an instance)."
        ) from err


def source_address(obj: Any) -> str:
    """Where ``obj`` lives, as ``"module:qualname"`` (``"module:"`` for a module itself)."""
    if inspect.ismodule(obj):
        return f"{obj.__name__}:"
    target = inspect.unwrap(obj)
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not module or not qualname:
        raise TypeError(f"cannot tell where {obj!r} is defined: pass a function, class, method or module.")
    return f"{module}:{qualname}"


def resolve_address(address: str) -> Any:
    """The object that :func:`source_address` named (the inverse, used by the tests)."""
    import importlib

    module_name, _, qualname = address.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


class SourceListing:
    """A rendered listing of package source: highlighted in a notebook, plain text elsewhere.

    Its notebook output carries ``{"llmlab": {"source_of": "module:qualname"}}`` so that
    ``tests/test_notebook_outputs.py`` can check it still equals the package's source.
    """

    def __init__(self, obj: Any) -> None:
        self.data = source(obj)
        self.address = source_address(obj)

    def __str__(self) -> str:
        return self.data

    def __repr__(self) -> str:
        return self.data

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": self.data}
        try:
            from IPython.display import Code

            bundle["text/html"] = Code(self.data, language="python")._repr_html_()
        except ImportError:  # IPython without pygments: plain text is enough
            pass
        return bundle, {OUTPUT_TAG: {"source_of": self.address}}


def show(obj: Any) -> SourceListing:
    """Render ``obj``'s source with syntax highlighting in a notebook (plain text elsewhere)."""
    return SourceListing(obj)


# --- save_figure: one picture, the same bytes on screen and on disk ---------------------------


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


class FigureTextTooSmall(ValueError):
    """A figure's text would be smaller than 9 pt where the notebook shows it."""


def png_width(png: bytes) -> int:
    """The width in pixels recorded in a PNG's header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    return struct.unpack(">I", png[16:20])[0]


def small_texts(fig, dpi: float, image_width_px: int) -> list[tuple[str, float]]:
    """The visible texts of ``fig`` that would show smaller than :data:`MIN_SCREEN_PX`.

    Returns ``(text, size in CSS px as shown)`` pairs. A text's size on screen is its
    font size in points × dpi / 72, times the factor by which the notebook scales an
    image wider than :data:`DISPLAY_WIDTH_PX` down.
    """
    from matplotlib.text import Text

    scale = min(1.0, DISPLAY_WIDTH_PX / image_width_px)
    found = []
    for text in fig.findobj(Text):
        label = text.get_text().strip()
        if not label or not text.get_visible() or not _is_drawn(text):
            continue
        shown_px = text.get_fontsize() * dpi / 72 * scale
        if shown_px < MIN_SCREEN_PX - 1e-9:
            found.append((label, shown_px))
    return found


def _is_drawn(text) -> bool:
    """False for a tick label whose tick falls outside its axis's view (matplotlib skips those)."""
    axes = text.axes
    if axes is None:
        return True
    for axis in (axes.xaxis, axes.yaxis):
        for tick in (*axis.majorTicks, *axis.minorTicks):
            if text in (tick.label1, tick.label2):
                low, high = sorted(axis.get_view_interval())
                loc = tick.get_loc()
                if loc is None:
                    return False
                span = high - low
                return low - 1e-9 * span <= loc <= high + 1e-9 * span
    return True


def figure_png(fig, dpi: int = 110) -> bytes:
    """The PNG bytes ``save_figure`` writes: tight bounding box, no timestamp or version metadata."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def save_figure(fig, name: str, dpi: int = 110, *, display: bool = True) -> None:
    """Save a matplotlib figure as ``<figures>/<name>.png`` and show exactly those bytes.

    - Refuses (``FigureTextTooSmall``) a figure with any text under 9 pt as shown in a
      notebook (:data:`MIN_SCREEN_PX`), naming the texts, so every figure reads on a projector.
    - In a notebook the saved PNG is displayed, tagged ``{"llmlab": {"figure": name}}``, and the
      figure is closed so it is not drawn twice; the tests compare the committed output with the
      committed file. The PNG carries no timestamp, so an unchanged picture rewrites the same bytes.
    """
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"figure name {name!r} must be a plain file name such as '01_tokens'.")
    stem = name[:-4] if name.endswith(".png") else name
    png = figure_png(fig, dpi)
    tiny = small_texts(fig, dpi, png_width(png))
    if tiny:
        listed = ", ".join(f"{label[:30]!r} ({px:.1f} px)" for label, px in tiny[:6])
        more = f" and {len(tiny) - 6} more" if len(tiny) > 6 else ""
        raise FigureTextTooSmall(
            f"figure {stem!r}: {len(tiny)} text(s) would show smaller than 9 pt "
            f"({MIN_SCREEN_PX:.0f} px) in the notebook: {listed}{more}. Raise their fontsize, "
            f"or make the figure narrower (images wider than {DISPLAY_WIDTH_PX} px are scaled down)."
        )
    path = figures_dir() / f"{stem}.png"
    path.write_bytes(png)
    if display and _in_notebook():
        import matplotlib.pyplot as plt
        from IPython.display import Image
        from IPython.display import display as ipython_display

        ipython_display(Image(data=png, format="png"), metadata={OUTPUT_TAG: {"figure": stem}})
        plt.close(fig)


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where displays become cell outputs)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


# --- exercises: unanswered until the learner answers -----------------------------------------

NOT_ANSWERED = "not answered yet"
"""What ``check`` prints for an exercise whose answer is still ``...`` (the tests look for it)."""


def _not_answered(name: str) -> None:
    print(f"✏️ {name}: {NOT_ANSWERED}: replace the ... with your answer and run the cell again "
          "(the solution is one click away, under the exercise).")


def _equal(got: Any, expected: Any, tol: float, atol: float) -> bool:
    """Numbers within ``tol`` (relative) or ``atol``; tensors and arrays element-wise; else ``==``."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and (isinstance(got, torch.Tensor) or isinstance(expected, torch.Tensor)):
        got_t, want_t = torch.as_tensor(got), torch.as_tensor(expected)
        if got_t.shape != want_t.shape:
            return False
        if got_t.is_floating_point() or want_t.is_floating_point():
            return bool(torch.allclose(got_t.double(), want_t.double(), rtol=tol, atol=atol, equal_nan=False))
        return bool(torch.equal(got_t, want_t))
    if isinstance(got, bool) != isinstance(expected, bool):
        return False  # True is not an answer for 1, nor 0 for False
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(got, numbers) and not isinstance(got, bool):
        if not (math.isfinite(got) and math.isfinite(expected)):
            return got == expected
        if tol or atol:
            return abs(got - expected) <= max(tol * abs(expected), atol)
        return got == expected
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(_equal(g, e, tol, atol) for g, e in zip(got, expected))
    return bool(got == expected)


def check(name: str, got: Any, expected: Any, *, tol: float = 0.0, atol: float = 0.0, hint: str = "") -> None:
    """A self-checking exercise or claim: ✓ when ``got`` matches ``expected``, else raise with a hint.

    - ``got is ...`` (an exercise not answered yet) prints "not answered yet" and returns;
    - numbers match within ``tol`` (relative) or ``atol`` (absolute); exact when both are 0;
    - tensors match in shape and within ``tol``/``atol``; lists element by element; anything else ``==``.
    """
    if got is ...:
        _not_answered(name)
        return
    if not _equal(got, expected, tol, atol):
        message = f"✗ {name}: got {got!r}, expected something else."
        raise AssertionError(message + (f" Hint: {hint}" if hint else ""))
    print(f"✓ {name}")


def check_function(
    name: str,
    candidate: Callable[..., Any],
    reference: Callable[..., Any],
    cases: Iterable[tuple],
    *,
    tol: float = 1e-5,
    atol: float = 1e-6,
    hint: str = "",
) -> None:
    """A coding exercise: ``candidate(*case)`` must equal ``reference(*case)`` on every case.

    A candidate that still has ``...`` as its body returns None: that prints
    "not answered yet". Tensors are compared by shape and within ``tol``/``atol``
    (float reductions differ in the last bits between CPUs); everything else exactly.
    """
    cases = list(cases)
    if not cases:
        raise ValueError(f"{name}: check_function needs at least one case")
    for index, case in enumerate(cases):
        got = candidate(*case)
        if got is None:
            if index == 0:
                _not_answered(name)
                return
            raise AssertionError(f"✗ {name}: returned None on case {index + 1} of {len(cases)}.")
        expected = reference(*case)
        if not _equal(got, expected, tol, atol):
            shapes = ""
            if hasattr(got, "shape") and hasattr(expected, "shape"):
                shapes = f" (got shape {tuple(got.shape)}, expected {tuple(expected.shape)})"
            message = f"✗ {name}: case {index + 1} of {len(cases)} differs from the package{shapes}."
            raise AssertionError(message + (f" Hint: {hint}" if hint else ""))
    print(f"✓ {name} ({len(cases)} cases)")
