"""Pictures of searches: reward curves and learning-rate sweeps, drawn with matplotlib.

matplotlib is an optional extra (`pip install matplotlib`), imported only
when a figure is drawn. Figures are made with `matplotlib.figure.Figure`
directly, not pyplot, so nothing here changes the caller's backend and
nothing needs a display.

    from nos.plots import Curve, curve_figure, save
    save(curve_figure([Curve("run 1", rows)]), "curve.png")
"""

from __future__ import annotations

import contextlib
import io
import math
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from nos.files import write_atomically
from nos.store.history import EvaluationRow, Sweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MATPLOTLIB_MISSING = "nos's plots need matplotlib, which is not installed: pip install matplotlib"


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def _figure(**kwargs) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable(MATPLOTLIB_MISSING) from exc
    return Figure(**kwargs)


def _as_written(text: str) -> str:
    """`text` for matplotlib to draw as it is: it reads what lies between two `$` as a formula,
    so a run named `lr $10^$` would stop the drawing (a mathtext error) and `$x^2$` would be typeset."""
    return text.replace("$", r"\$")


def _fit(text: str, width: int, lines: int = 1) -> str:
    """`text` on at most `lines` lines of about `width` characters, cut with "…" past them: a title with a
    long rule's text ran off both edges of the figure."""
    if len(text) <= width:
        return text
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def _shortened(label: str, width: int) -> str:
    """`label` cut in the middle to `width` characters: a run's label starts with its id and ends with its
    searcher, and both stay readable."""
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return label[:head] + "…" + label[len(label) - (width - 1 - head):]


def _fit_label(label: str, suffix: str, points: float, fontsize: str) -> str:
    """`label`, cut in the middle as little as lets `label + suffix` be at most `points` wide: a 200-character run
    name ran under the other legend and off the figure, and took the run's best reward with it. Measured in the
    font, not counted: ten W's are as wide as thirty-five i's."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    font = FontProperties(size=fontsize)

    def fits(text: str) -> bool:
        with _quiet_glyphs():
            return text_to_path.get_text_width_height_descent(text + suffix, font, ismath=False)[0] <= points

    if fits(label):
        return label
    low, high = 1, len(label) - 1   # the longest cut that fits, by halves
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(_shortened(label, middle)) else (low, middle - 1)
    return _shortened(label, low)


@contextlib.contextmanager
def _quiet_glyphs() -> Iterator[None]:
    """No warning for a character the font lacks (训练, emoji): matplotlib warns once a glyph, with a source line,
    on the user's terminal, and the picture shows a box there already."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        yield


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        _figure()
    except PlotUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Curve:
    """One run's evaluations to draw as a reward curve."""

    label: str
    rows: Sequence[EvaluationRow]


@dataclass(frozen=True)
class CurveData:
    """What a curve draws, in seq order: one entry per finished evaluation the budget counts."""

    seq: list[int]
    counted: list[int]        # 1, 2, ...: the evaluation's place among those the budget counts
    reward: list[float]       # failed evaluations drawn at 0 (the searcher does not learn from them)
    failed: list[bool]
    mean: list[float]         # trailing moving mean over `window` evaluations
    best: list[float]         # best reward so far


def curve_data(rows: Sequence[EvaluationRow], window: int = 20) -> CurveData:
    """The points of a reward curve: finished evaluations by seq.

    Queued and running ones are left out, and so are rejected proposals: they cost no
    training and the budget does not count them (`nos status` does).
    """
    finished = sorted((r for r in rows if r.counted), key=lambda r: r.seq)
    seq = [r.seq for r in finished]
    reward = [r.reward if r.reward is not None else 0.0 for r in finished]
    failed = [r.status == "failed" for r in finished]
    mean, best, total, top = [], [], 0.0, -math.inf
    for i, value in enumerate(reward):
        total += value - (reward[i - window] if i >= window else 0.0)
        mean.append(total / min(i + 1, window))
        top = max(top, value)
        best.append(top)
    return CurveData(seq, list(range(1, len(seq) + 1)), reward, failed, mean, best)


def curve_figure(curves: Sequence[Curve], *, window: int = 20, title: str | None = None,
                 size: tuple[float, float] = (9.0, 5.5)) -> Figure:
    """Reward against evaluation number: each evaluation a dot, a moving mean, the best so far; runs overlaid.

    Below the axes, one legend names the runs by colour, the other the kinds of mark.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = _figure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    runs, any_failed = [], False
    # The run legend shares the bottom row with the legend of marks, which takes about a third of it.
    label_points = size[0] * 72 * 0.6 - 30
    for i, curve in enumerate(curves):
        color = f"C{i % 10}"
        data = curve_data(curve.rows, window)
        ok = [j for j, f in enumerate(data.failed) if not f]
        ax.scatter([data.counted[j] for j in ok], [data.reward[j] for j in ok], s=16, color=color, alpha=0.55,
                   linewidths=0)
        bad = [j for j, f in enumerate(data.failed) if f]
        if bad:
            any_failed = True
            ax.scatter([data.counted[j] for j in bad], [0.0] * len(bad), s=26, marker="x", color=color, alpha=0.8)
        ax.plot(data.counted, data.mean, color=color, linewidth=2)
        ax.step(data.counted, data.best, where="post", color=color, linewidth=1.3, linestyle="--")
        best = f", best {data.best[-1]:.4f}" if data.best else ", nothing finished"
        label = _fit_label(curve.label, best, label_points, "small")
        runs.append(Line2D([], [], color=color, linewidth=3, label=f"{_as_written(label)}{best}"))
    ax.set_xlabel("evaluation (trained, from the cache or failed; rejections not shown)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))   # evaluation 1, 2: never 1.5
    ax.set_ylabel("reward (final validation score)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(_as_written(_fit(title, int(size[0] * 10), lines=2)))
    if curves:
        gray = "0.35"
        kinds = [Line2D([], [], color=gray, marker="o", markersize=4, linestyle="none", label="an evaluation"),
                 Line2D([], [], color=gray, linewidth=2, label=f"mean of the last {window}"),
                 Line2D([], [], color=gray, linewidth=1.3, linestyle="--", label="best so far")]
        if any_failed:
            kinds.append(Line2D([], [], color=gray, marker="x", linestyle="none", label="failed (counts 0)"))
        fig.legend(handles=runs, loc="outside lower left", fontsize="small", frameon=False)
        fig.legend(handles=kinds, loc="outside lower right", ncols=2, fontsize="small", frameon=False)
    return fig


def sweep_figure(sweeps: Sequence[Sweep], *, labels: Sequence[str] | None = None, title: str | None = None,
                 size: tuple[float, float] = (7.0, 4.5), legend: bool = True) -> Figure:
    """Validation accuracy against learning rate (log x), one line per sweep.

    Diverged rates are crosses at 0 (the score the protocol gives them). Rates that successive
    halving stopped early were never scored: the line has a gap there, and a hollow circle on
    the x axis marks each one. Each kind of mark is named in the legend once, by the first sweep
    that has it.
    """
    fig = _figure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    named: set[str] = set()

    def once(label: str) -> str | None:
        if label in named:
            return None
        named.add(label)
        return label

    for i, sweep in enumerate(sweeps):
        color = f"C{i % 10}"
        label = labels[i] if labels else f"run {sweep.run_id}, seq {sweep.seq} ({sweep.task})"
        # NaN breaks the line: an unscored rate has no accuracy to draw, not an accuracy of 0.
        accs = [0.0 if p.diverged else math.nan if p.val_acc is None else p.val_acc for p in sweep.points]
        ax.plot([p.lr for p in sweep.points], accs, marker="o", markersize=4, color=color, linewidth=1.5,
                label=_as_written(label))
        diverged = [p.lr for p in sweep.points if p.diverged]
        if diverged:
            ax.scatter(diverged, [0.0] * len(diverged), marker="x", s=40, color="black", zorder=3,
                       label=once("diverged"))
        unscored = [p.lr for p in sweep.points if p.val_acc is None and not p.diverged]
        if unscored:   # on the x axis itself (axes y = 0), below any score
            ax.scatter(unscored, [0.0] * len(unscored), marker="o", s=36, facecolors="none", edgecolors=color,
                       linewidths=1.3, zorder=4, clip_on=False, transform=ax.get_xaxis_transform(),
                       label=once("stopped early by halving (not scored)"))
        if sweep.best_lr is not None and sweep.reward is not None:
            ax.scatter([sweep.best_lr], [sweep.reward], marker="*", s=110, color=color, edgecolors="black",
                       linewidths=0.5, zorder=4, label=once("reward (final run at the best rate)"))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation score (sweep)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, which="major", alpha=0.3)
    if title:   # a rule's text can be long: on up to three lines, then cut
        ax.set_title(_as_written(_fit(title, int(size[0] * 11), lines=3)), fontsize="medium")
    if legend and sweeps:
        ax.legend(fontsize="small", framealpha=0.85)
    return fig


# Formats whose matplotlib backend runs an external program: pgf measures text with a TeX installation, and
# fails without one (with a traceback); nos does not need TeX anywhere else.
NEEDS_TEX = ("pgf",)


def image_formats(fig: Figure) -> list[str]:
    """The suffixes `save` writes, without the dot."""
    return sorted(f for f in fig.canvas.get_supported_filetypes() if f not in NEEDS_TEX)


def _render(fig: Figure, fmt: str) -> bytes:
    """The figure as a file of format `fmt`, in memory."""
    buffer = io.BytesIO()
    with _quiet_glyphs():
        fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def png_bytes(fig: Figure) -> bytes:
    return _render(fig, "png")


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure in the format its suffix names (png, svg, pdf, jpg, ...), PNG without one.

    ValueError, before anything is written, for a suffix matplotlib cannot write: `out.jpg` was once
    written as a PNG, which a viewer trusting the name then refused. The file is drawn in memory, then
    written whole (`write_atomically`): a failed write leaves an earlier file as it was.
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".") or "png"
    formats = image_formats(fig)
    if suffix not in formats:
        why = "needs TeX, which nos does not use" if suffix in NEEDS_TEX else "is no image format matplotlib writes"
        raise ValueError(f"cannot write {path.name}: .{suffix} {why}; "
                         f"use one of {', '.join('.' + f for f in formats)}")
    return write_atomically(path, _render(fig, suffix))


__all__ = [
    "MATPLOTLIB_MISSING", "NEEDS_TEX", "Curve", "CurveData", "PlotUnavailable", "available", "curve_data",
    "curve_figure", "image_formats", "png_bytes", "save", "sweep_figure",
]
