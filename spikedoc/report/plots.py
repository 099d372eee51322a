"""The report's plots as PNG bytes: the run overview, an incident's zoom, its tensor heatmap and ratios.

Figures are built with matplotlib's object API (no pyplot: no global state, no display needed) and
with math text off, so a `$` in a tensor name is drawn as a `$`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from spikedoc.report.envelope import envelope

__all__ = ["SEVERITY_COLORS", "Span", "overview_png", "window_png", "heatmap_png", "tensor_lines_png", "gradient_z", "panels_with_data"]

#: Shading of an incident by severity (also used by the page's badges).
SEVERITY_COLORS = {"minor": "#f2c94c", "moderate": "#f2994a", "severe": "#eb5757"}

# Series drawn, in panel order, with their label and whether a log axis suits them.
_PANELS = (
    ("loss", "loss", False),
    ("grad_norm", "grad norm", True),
    ("lr", "learning rate", False),
    ("clip_coef", "clip coefficient", False),
)
_DPI = 90
# An incident a few steps long in a run of a million would be narrower than a pixel: shade at least
# this share of the x range so every incident stays visible on the overview.
_MIN_SPAN_SHARE = 0.003
_RC = {"text.parse_math": False, "font.size": 8, "axes.titlesize": 9}


@dataclass(frozen=True)
class Span:
    """A stretch of steps to shade: an incident from onset to end, coloured by severity."""

    first: int
    last: int
    severity: str
    label: str


def panels_with_data(steps: pd.DataFrame) -> list[str]:
    """Columns of `_PANELS` that hold at least one finite value in `steps` (an import may lack some).

    Example:
        >>> panels_with_data(pd.DataFrame({"step": [0, 1], "loss": [3.0, 2.9], "lr": [np.nan, np.nan]}))
        ['loss']
    """
    return [c for c, _, _ in _PANELS if c in steps.columns and np.isfinite(pd.to_numeric(steps[c], errors="coerce")).any()]


def overview_png(steps: pd.DataFrame, spans: list[Span], marks: list[tuple[int, str]], *, buckets: int = 1500) -> bytes:
    """The whole run: one panel per recorded series, incidents shaded, guard actions as lines.

    Args:
        steps: One row per step (`step` and any of loss, grad_norm, lr, clip_coef), in step order.
        spans: Incidents to shade.
        marks: (step, label) of guard actions, drawn as dashed vertical lines.
        buckets: Points per series at most; longer series become a min/max envelope.

    Example:
        >>> png = overview_png(pd.DataFrame({"step": range(100), "loss": np.linspace(3, 2, 100)}), [], [])
        >>> png[:4]
        b'\\x89PNG'
    """
    columns = panels_with_data(steps)
    x = steps["step"].to_numpy()
    lo, hi = (int(x.min()), int(x.max())) if len(x) else (0, 1)
    min_width = _MIN_SPAN_SHARE * max(hi - lo, 1)
    with rc_context(_RC):
        fig = Figure(figsize=(10, 1.7 * max(len(columns), 1) + 0.4), dpi=_DPI, layout="constrained")
        axes = fig.subplots(max(len(columns), 1), 1, sharex=True, squeeze=False)[:, 0]
        for ax, column in zip(axes, columns):
            label, log = next((lab, lg) for c, lab, lg in _PANELS if c == column)
            _draw_series(ax, x, pd.to_numeric(steps[column], errors="coerce").to_numpy(np.float64), buckets, log)
            ax.set_ylabel(label)
            for span in spans:
                width = max(span.last + 1 - span.first, min_width)
                ax.axvspan(span.first, span.first + width, color=SEVERITY_COLORS.get(span.severity, "#bbbbbb"),
                           alpha=0.45, lw=0)
            for step, _ in marks:
                ax.axvline(step, color="#2d6cdf", ls="--", lw=0.9)
        for span in (s for s in spans if s.label):
            axes[0].annotate(span.label, (span.first, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                             va="bottom", ha="left", color="#555555")
        axes[-1].set_xlabel("step")
        axes[-1].set_xlim(lo, hi if hi > lo else lo + 1)
        return _png(fig)


def window_png(steps: pd.DataFrame, first: int, last: int, span: Span, marks: list[tuple[int, str]]) -> bytes:
    """One incident's neighbourhood, every step drawn, the incident shaded.

    Example:
        >>> frame = pd.DataFrame({"step": range(300), "loss": np.linspace(3, 2, 300)})
        >>> window_png(frame, 100, 200, Span(140, 150, "severe", "#1"), [])[:4]
        b'\\x89PNG'
    """
    part = steps[(steps["step"] >= first) & (steps["step"] <= last)]
    return overview_png(part, [span], [m for m in marks if first <= m[0] <= last], buckets=max(len(part), 1))


def gradient_z(layers: pd.DataFrame, shown_from: int, *, floor: float = 0.02) -> pd.DataFrame:
    """Per-tensor robust z of log10(grad_norm) (steps x tensors) against each tensor's own history.

    The history is every row before `shown_from`; z = (log10 value - median) / max(1.4826 MAD, floor),
    the scale `spikedoc.analysis.attribution` judges departures on. A NaN or inf gradient norm is
    z = inf, the most extreme departure there is.

    Args:
        layers: Layer rows (`step`, `name`, `grad_norm`) from before `shown_from` to the window's end.
        shown_from: First step shown; rows before it form the history.
        floor: Smallest sigma believed, in decades (~5% at 0.02).

    Returns:
        z for steps >= `shown_from`, one column per tensor (NaN where a tensor has no history or no row).

    Example:
        >>> rows = pd.DataFrame({"step": np.repeat(np.arange(60), 2), "name": ["a", "b"] * 60,
        ...                      "grad_norm": [1.0, 2.0] * 59 + [1.0, 200.0]})
        >>> z = gradient_z(rows, shown_from=50)
        >>> round(float(z.loc[59, "b"]))
        100
    """
    frame = layers[["step", "name", "grad_norm"]].copy()
    frame["name"] = frame["name"].astype(str)
    frame["grad_norm"] = pd.to_numeric(frame["grad_norm"], errors="coerce").fillna(np.inf)  # a row with NaN: non-finite
    wide = frame.drop_duplicates(["step", "name"], keep="last").pivot(index="step", columns="name", values="grad_norm")
    with np.errstate(divide="ignore", invalid="ignore"):
        values = wide.to_numpy(np.float64)
        logs = np.log10(np.where(values > 0, values, np.nan))
    before = wide.index.to_numpy() < shown_from
    history = np.where(np.isfinite(logs[before]), logs[before], np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a tensor without history keeps z = NaN
        center = np.nanmedian(history, axis=0)
        sigma = np.fmax(1.4826 * np.nanmedian(np.abs(history - center), axis=0), floor)
        z = (logs[~before] - center) / sigma
    return pd.DataFrame(z, index=wide.index[~before], columns=wide.columns)


def heatmap_png(z: pd.DataFrame, leaders: list[str], onset: int, *, max_rows: int = 30) -> bytes:
    """Heatmap of per-tensor gradient-norm z-scores, tensors x steps, leaders marked with `>`.

    Rows are the leading tensors (in their given order), then the others by their largest z, at most
    `max_rows`; colour saturates at |z| = 12 (the attribution threshold is 6). The onset is a line.

    Example:
        >>> z = pd.DataFrame([[0.0, 9.0], [1.0, 2.0]], index=[10, 11], columns=["a", "b"])
        >>> heatmap_png(z, ["b"], onset=11)[:4]
        b'\\x89PNG'
    """
    peak = z.replace(np.inf, 1e9).max(axis=0, skipna=True).fillna(-np.inf)
    lead = [n for n in leaders if n in z.columns]
    rest = [n for n in peak.sort_values(ascending=False).index if n not in lead]
    rows = (lead + rest)[:max_rows]
    data = z[rows].to_numpy(np.float64).T if rows else np.zeros((1, max(len(z), 1)))
    data = np.where(np.isposinf(data), 12.0, data)
    labels = [("> " if n in lead else "") + n for n in rows] or ["(no per-tensor rows)"]
    steps = z.index.to_numpy()
    with rc_context(_RC):
        fig = Figure(figsize=(10, 0.8 + 0.22 * len(labels)), dpi=_DPI, layout="constrained")
        ax = fig.subplots()
        first, last = (steps[0], steps[-1]) if len(steps) else (0, 1)
        image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-12, vmax=12, interpolation="nearest",
                          extent=(first - 0.5, last + 0.5, len(labels) - 0.5, -0.5))
        ax.set_yticks(range(len(labels)), labels)
        for tick, name in zip(ax.get_yticklabels(), rows):
            if name in lead:
                tick.set_fontweight("bold")
        ax.axvline(onset - 0.5, color="black", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step (line: onset)")
        fig.colorbar(image, ax=ax, label="grad-norm z (robust sigmas, log10)", shrink=0.9)
        return _png(fig)


def tensor_lines_png(layers: pd.DataFrame, names: list[str], columns: list[tuple[str, str]], onset: int) -> bytes:
    """One panel per (column, label): that column's value per step for each tensor in `names`.

    Example:
        >>> rows = pd.DataFrame({"step": [0, 1, 0, 1], "name": ["a", "a", "b", "b"], "update_ratio": [1e-3, 2e-3, 1e-3, 1e-2]})
        >>> tensor_lines_png(rows, ["a", "b"], [("update_ratio", "update/weight")], onset=1)[:4]
        b'\\x89PNG'
    """
    with rc_context(_RC):
        fig = Figure(figsize=(10, 1.9 * len(columns) + 0.5), dpi=_DPI, layout="constrained")
        axes = fig.subplots(len(columns), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (column, label) in zip(axes, columns):
            positive = False
            for name in names:
                rows = layers[layers["name"].astype(str) == name]
                values = pd.to_numeric(rows[column], errors="coerce")
                positive = positive or bool((values > 0).any())
                ax.plot(rows["step"], values, lw=1.1, label=name)
            if column == "update_ratio" and positive:  # no positive value (steps without updates): no log axis
                _log_axis(ax)
            ax.axvline(onset, color="black", lw=0.8)
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7, loc="upper left", ncols=min(len(names), 3), frameon=False)
        axes[-1].set_xlabel("step (line: onset)")
        return _png(fig)


def _draw_series(ax, x: np.ndarray, y: np.ndarray, buckets: int, log: bool) -> None:
    env = envelope(x, y, buckets)
    finite = env.high[np.isfinite(env.high)]
    use_log = log and finite.size and (finite > 0).all()
    if env.reduced:
        ax.fill_between(env.step, env.low, env.high, color="#1f4e9c", lw=0.6, alpha=0.85, step="mid")
    else:
        ax.plot(env.step, env.high, color="#1f4e9c", lw=1.0)
    if use_log:
        _log_axis(ax)
    if env.nonfinite_steps.size:
        top = finite.max() if finite.size else 1.0
        ax.plot(env.nonfinite_steps, np.full(env.nonfinite_steps.size, top), "x", color="#c0392b", ms=5,
                label="non-finite")
        ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax.grid(alpha=0.25, lw=0.5)


def _log_axis(ax) -> None:
    # With math text off, matplotlib's default log labels would show their TeX source: plain numbers.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # A range under a decade or two shows one power of ten at most: label the 2x and 5x ticks too.
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else ""))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    # Plots use few colours: a 128-colour palette PNG is ~3x smaller than matplotlib's RGBA one and
    # looks the same, which keeps a report with many incidents small enough to mail.
    from PIL import Image  # matplotlib's own dependency

    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(colors=128)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
