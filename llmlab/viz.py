"""Figures the notebooks share (matplotlib only; global state changes only in ``use_projector_style``).

The pipeline diagram is drawn in notebook 00; token strips in notebook 01;
later notebooks add heatmaps, scatter plots and bar breakdowns here.
Every figure must read on a projector: ``llmlab.save_figure`` refuses text under
9 pt as shown, and ``use_projector_style`` sets defaults that pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

PIPELINE: list[tuple[str, str]] = [
    ("text", "01"),
    ("tokens", "01"),
    ("token ids", "01"),
    ("embeddings", "02"),
    ("+ positions", "03"),
    ("Q / K / V", "04"),
    ("attention", "04"),
    ("causal mask", "05"),
    ("FFN + norm\n+ residual", "06"),
    ("× N blocks", "06"),
    ("LM head →\nlogits", "06"),
    ("softmax →\nsample", "08"),
    ("next token", "08"),
]
"""The course's pipeline, stage by stage, with the notebook that teaches each stage."""

PROJECTOR_STYLE: dict[str, object] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
    "legend.title_fontsize": 11,
    "figure.titlesize": 14,
    "figure.dpi": 110,
}
"""Matplotlib defaults for figures shown on a 1280-px projector (set by :func:`use_projector_style`)."""


def use_projector_style() -> None:
    """Set matplotlib's defaults to :data:`PROJECTOR_STYLE` (each notebook calls it once, first)."""
    plt.rcParams.update(PROJECTOR_STYLE)


TOKEN_COLOURS = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d8f3dc", "#fce1c8", "#cddafd"]
"""Pastel backgrounds that alternate between neighbouring tokens."""


def pipeline_diagram(highlight: str | None = None, per_row: int = 7):
    """Draw text → … → next token as boxes and arrows; ``highlight`` names one stage to colour.

    The arrow from the last stage loops back to the start: generation appends the
    new token and runs again.
    """
    names = [name for name, _ in PIPELINE]
    if highlight is not None and highlight not in names:
        raise ValueError(f"unknown stage {highlight!r}; stages are {names}.")
    rows = (len(PIPELINE) + per_row - 1) // per_row
    fig, ax = plt.subplots(figsize=(1.6 * per_row, 1.45 * rows + 0.2))
    ax.set_xlim(-0.1, per_row * 1.5 - 0.2)
    ax.set_ylim(-(rows - 1) * 1.6 - 0.5, 0.5)
    ax.axis("off")
    centres = []
    for i, (name, notebook) in enumerate(PIPELINE):
        row, col = divmod(i, per_row)
        if row % 2:  # snake back so arrows stay short
            col = per_row - 1 - col
        x, y = col * 1.5 + 0.6, -row * 1.6
        colour = "#ffd166" if name == highlight else "#e9f1fb"
        ax.add_patch(
            FancyBboxPatch((x - 0.6, y - 0.4), 1.2, 0.8, boxstyle="round,pad=0.02,rounding_size=0.12", fc=colour, ec="#33415c")
        )
        ax.text(x, y + 0.05, name, ha="center", va="center", fontsize=12)
        ax.text(x, y - 0.3, f"nb {notebook}", ha="center", va="center", fontsize=11, color="#5c677d")
        centres.append((x, y))
    for (x0, y0), (x1, y1) in zip(centres, centres[1:]):
        if y0 == y1:
            start, end = (x0 + 0.6 * (1 if x1 > x0 else -1), y0), (x1 - 0.6 * (1 if x1 > x0 else -1), y1)
        else:
            start, end = (x0, y0 - 0.4), (x1, y1 + 0.4)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#33415c"))
    # The loop back: from the last stage to the first, with its note in the free slot beside it.
    (xl, yl), (xf, yf) = centres[-1], centres[0]
    ax.add_patch(
        FancyArrowPatch((xl - 0.6, yl + 0.2), (xf, yf - 0.4), connectionstyle="arc3,rad=-0.25", arrowstyle="-|>",
                        mutation_scale=12, color="#c1121f", linestyle="--")
    )
    ax.text(xf - 0.6, yl - 0.15, "append the\ntoken and\nrepeat (08;\n09: KV cache)",
            ha="left", va="center", fontsize=11, color="#c1121f")
    fig.tight_layout()
    return fig


def token_strip(pieces: Sequence[str], ids: Sequence[int] | None = None, ax=None, title: str | None = None,
                per_line: int = 12):
    """Draw tokens as coloured boxes (with their ids underneath), wrapping after ``per_line`` tokens."""
    if ids is not None and len(ids) != len(pieces):
        raise ValueError(f"{len(pieces)} pieces but {len(ids)} ids: pass one id per piece.")
    lines = max(1, (len(pieces) + per_line - 1) // per_line)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(per_line, max(len(pieces), 1)) * 0.95 + 0.5, 0.85 * lines + 0.3))
    ax.set_xlim(0, per_line)
    ax.set_ylim(-lines, 0.1)
    ax.axis("off")
    for i, piece in enumerate(pieces):
        row, col = divmod(i, per_line)
        label = piece.replace("\n", "↵").replace(" ", "␣") or "∅"
        ax.add_patch(FancyBboxPatch((col + 0.04, -row - 0.55), 0.92, 0.5, boxstyle="round,pad=0.01",
                                    fc=TOKEN_COLOURS[i % len(TOKEN_COLOURS)], ec="#8d99ae", lw=0.6))
        ax.text(col + 0.5, -row - 0.3, label, ha="center", va="center", fontsize=11)
        if ids is not None:
            ax.text(col + 0.5, -row - 0.75, str(ids[i]), ha="center", va="center", fontsize=10, color="#5c677d")
    if title:
        ax.set_title(title, fontsize=12, loc="left")
    return ax


def _as_array(values):
    """A float NumPy array from a tensor, an array or nested lists."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def heatmap(matrix, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None, ax=None,
            title: str | None = None, cmap: str = "viridis", annotate: bool | None = None, fmt: str = ".2f",
            colorbar: bool = True, vmin: float | None = None, vmax: float | None = None):
    """Draw a 2-D array (attention weights, masks, positional tables) with optional labels and values.

    ``-inf`` entries (masked scores) are drawn in grey and annotated as "−∞".
    ``annotate`` defaults to True for matrices up to 12 × 12.
    """
    import numpy as np

    data = _as_array(matrix)
    if data.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {data.shape}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.6 * data.shape[1] + 2, 10), min(0.5 * data.shape[0] + 1.2, 8)))
    shown = np.ma.masked_invalid(np.where(np.isneginf(data), np.nan, data))
    colours = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    image = ax.imshow(shown, cmap=colours, aspect="auto", vmin=vmin, vmax=vmax)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), row_labels)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=45 if max(map(len, col_labels), default=0) > 3 else 0,
                      ha="right" if max(map(len, col_labels), default=0) > 3 else "center")
    if annotate is None:
        annotate = data.shape[0] <= 12 and data.shape[1] <= 12
    if annotate:
        finite = data[np.isfinite(data)]
        middle = (finite.max() + finite.min()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(data):
            label = "−∞" if np.isneginf(value) else format(value, fmt)
            colour = "black" if np.isneginf(value) or value > middle else "white"
            ax.text(j, i, label, ha="center", va="center", fontsize=10, color=colour)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title, fontsize=12)
    return ax


def scatter_2d(points, labels: Sequence[str], ax=None, title: str | None = None, colour: str = "#4c78a8",
               arrows: Sequence[tuple[int, int]] = ()):
    """Scatter 2-D vectors (e.g. 2-D embeddings) with a text label each, and optional arrows i → j."""
    import numpy as np

    xy = _as_array(points)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"scatter_2d needs points of shape [n, 2], got {xy.shape}.")
    if len(labels) != len(xy):
        raise ValueError(f"{len(xy)} points but {len(labels)} labels.")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(xy[:, 0], xy[:, 1], color=colour, zorder=3)
    for (x, y), label in zip(xy, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=11)
    for i, j in arrows:
        ax.annotate("", xy=xy[j], xytext=xy[i], arrowprops=dict(arrowstyle="->", color="#c1121f", lw=1.2))
    ax.axhline(0, color="#bbbbbb", lw=0.6, zorder=0)
    ax.axvline(0, color="#bbbbbb", lw=0.6, zorder=0)
    if title:
        ax.set_title(title, fontsize=12)
    return ax


def bar_breakdown(breakdown: dict[str, dict[str, float]], ax=None, title: str | None = None, unit: str = "",
                  log: bool = False, horizontal: bool = True):
    """Stacked bars: one bar per key of ``breakdown``, one segment per inner key (e.g. parameters per component)."""
    if not breakdown:
        raise ValueError("bar_breakdown needs at least one bar.")
    components = list(dict.fromkeys(c for parts in breakdown.values() for c in parts))
    names = list(breakdown)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.5))
    starts = [0.0] * len(names)
    palette = plt.get_cmap("tab10")
    for k, component in enumerate(components):
        values = [breakdown[n].get(component, 0.0) for n in names]
        if horizontal:
            ax.barh(names, values, left=starts, label=component, color=palette(k % 10))
        else:
            ax.bar(names, values, bottom=starts, label=component, color=palette(k % 10))
        starts = [s + v for s, v in zip(starts, values)]
    if log:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    (ax.set_xlabel if horizontal else ax.set_ylabel)(unit)
    ax.legend(fontsize=11, loc="best")
    if title:
        ax.set_title(title, fontsize=12)
    return ax


def plot_history(history, ax=None, per_char: float | None = None, title: str = "training"):
    """Train (every step, smoothed) and evaluation losses against steps (notebook 07).

    ``per_char``: divide losses by this many characters per token to show nats per character.
    """
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    scale = 1.0 / per_char if per_char else 1.0
    steps = np.asarray(history.step)
    if len(steps):
        raw = np.asarray(history.train_loss) * scale
        window = max(1, len(raw) // 50)
        smooth = np.convolve(raw, np.ones(window) / window, mode="valid")
        ax.plot(steps, raw, color="#4c78a8", alpha=0.25, lw=0.8)
        ax.plot(steps[window - 1:], smooth, color="#4c78a8", label="train (batch)")
    if history.eval_step:
        ax.plot(history.eval_step, np.asarray(history.eval_train_loss) * scale, "o-", color="#72b7b2", ms=3,
                label="train (eval)")
        ax.plot(history.eval_step, np.asarray(history.eval_val_loss) * scale, "o-", color="#f58518", ms=3,
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)" if per_char else "loss (nats per token)")
    ax.set_title(title, fontsize=12)
    ax.legend(fontsize=11)
    return ax


def live_loss_plot(per_char: float | None = None):
    """A ``Trainer.fit`` callback that redraws the loss curves in place in a notebook."""
    from IPython.display import display

    handle = display(display_id=True)

    def callback(trainer) -> None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        plot_history(trainer.history, ax=ax, per_char=per_char, title=f"step {trainer.step}")
        handle.update(fig)
        plt.close(fig)

    return callback
