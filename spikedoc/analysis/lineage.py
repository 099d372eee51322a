"""Restarts and resumes: split a run into pieces, rebuild each piece's lineage, check resumes.

A run directory may hold several segments (each `watch()` appended to it) and a segment may start
at a step the run already passed (resumed from a checkpoint, or rolled back). The model that trains
in a piece descends from the rows of earlier pieces *before* the step it resumed at; the rows it
redid belong to an abandoned branch. Analysing each piece on its own lineage keeps the detector's
baseline across a resume and never mixes two trajectories of the same steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import finite, fmt
from spikedoc.analysis.config import AnalysisConfig

__all__ = ["Piece", "Resume", "Lineage", "check_resume", "moments_ratio"]

_log = logging.getLogger(__name__)

#: Steps averaged on each side of a resume; few, because a reset model relearns fast.
_RESUME_STEPS = 3
#: Steps averaged for the run's initial loss.
_INITIAL_STEPS = 5
#: A run counts as having learned when its loss fell at least this share below the initial loss.
_MIN_LEARNED = 0.2


@dataclass(kw_only=True)
class Piece:
    """A stretch of rows whose step increases, within one segment."""

    index: int
    """Position in recording order (0-based)."""
    segment: int
    """Value of the `segment` column."""
    first_step: int
    last_step: int
    rows: int
    resumed: bool = False
    """Continues an earlier piece's lineage (it started after step 0 and rows before it exist)."""


@dataclass(kw_only=True)
class Resume:
    """What happened to the loss (and LR) when a piece resumed an earlier lineage."""

    segment: int
    step: int
    """First step of the resumed piece."""
    prev_step: int
    """Last lineage step before it."""
    initial_loss: float
    loss_before: float
    loss_after: float
    back_fraction: float
    """(loss_after - loss_before) / (initial_loss - loss_before): 1.0 means back at the start."""
    lr_before: float = math.nan
    lr_after: float = math.nan
    state_reset: bool = False
    evidence: list[str] = field(default_factory=list)


class Lineage:
    """A step table split into pieces, with one lineage frame per piece.

    Args:
        steps: one row per step (ranks already reduced), in recording order within segments.

    Example:
        >>> import pandas as pd
        >>> steps = pd.DataFrame({"step": [0, 1, 2, 1, 2, 3], "segment": [0, 0, 0, 1, 1, 1], "loss": 1.0})
        >>> lin = Lineage(steps)
        >>> list(lin.frame(1)["segment"])
        [0, 1, 1, 1]
    """

    def __init__(self, steps: pd.DataFrame) -> None:
        # A shallow copy: columns are replaced, never written into (pandas copies on write), so a
        # million-row table already in order is not copied at all.
        frame = steps.copy(deep=False)
        if "segment" not in frame.columns:
            frame["segment"] = 0
        frame["segment"] = frame["segment"].fillna(0).astype("int64")
        frame["step"] = frame["step"].astype("int64")
        seg = frame["segment"].to_numpy()
        if _has_time(frame):
            order = np.lexsort((frame["time"].to_numpy(dtype=float), seg))  # stable: ties keep row order
            if (order[1:] < order[:-1]).any():
                frame = frame.take(order)
            frame = frame.reset_index(drop=True)
        else:
            # Without wall time a repeated step cannot be told from a re-logged one: keep the last.
            order = np.argsort(seg, kind="stable")
            if (order[1:] < order[:-1]).any():
                frame = frame.take(order)
            frame = frame.drop_duplicates(["segment", "step"], keep="last").reset_index(drop=True)
        step = frame["step"].to_numpy()
        seg = frame["segment"].to_numpy()
        new_piece = np.ones(len(frame), dtype=bool)
        if len(frame) > 1:
            new_piece[1:] = (seg[1:] != seg[:-1]) | (step[1:] <= step[:-1])
        frame["_piece"] = np.cumsum(new_piece) - 1
        self._frame = frame
        self.pieces: list[Piece] = []
        for index, rows in self._frame.groupby("_piece", sort=True):
            self.pieces.append(
                Piece(
                    index=int(index),
                    segment=int(rows["segment"].iloc[0]),
                    first_step=int(rows["step"].iloc[0]),
                    last_step=int(rows["step"].iloc[-1]),
                    rows=len(rows),
                )
            )
        for piece in self.pieces[1:]:
            piece.resumed = piece.first_step > 0 and bool(self._ancestor_mask(piece.index).any())
        self._frames: dict[int, pd.DataFrame] = {}

    def _ancestor_mask(self, index: int) -> np.ndarray:
        """Rows of earlier pieces that lead into piece `index`."""
        piece_of = self._frame["_piece"].to_numpy()
        step = self._frame["step"].to_numpy()
        mask = np.zeros(len(self._frame), dtype=bool)
        cutoff = self.pieces[index].first_step
        for earlier in reversed(self.pieces[:index]):
            if cutoff <= 0:
                break
            mask |= (piece_of == earlier.index) & (step < cutoff)
            cutoff = min(cutoff, earlier.first_step)
        return mask

    def frame(self, index: int) -> pd.DataFrame:
        """The lineage of piece `index`: its ancestors' rows then its own, ordered by step.

        Column `_own` marks the piece's own rows (incidents are reported only there).
        """
        if index not in self._frames:
            own = self._frame["_piece"].to_numpy() == index
            mask = own | self._ancestor_mask(index)
            # A run of one piece is its own lineage: no copy of its rows.
            frame = self._frame.copy(deep=False) if mask.all() else self._frame.loc[mask]
            frame["_own"] = own[mask]
            step = frame["step"].to_numpy()
            if (step[1:] < step[:-1]).any():
                frame = frame.sort_values("step", kind="stable")
            self._frames[index] = frame.reset_index(drop=True)
        return self._frames[index]

    def final(self) -> pd.DataFrame:
        """Lineage of the last piece: the trajectory the run ended on."""
        return self.frame(self.pieces[-1].index)

    def abandoned_steps(self) -> list[dict[str, int]]:
        """Step ranges recorded in a piece but redone by a later one (branches rolled back from)."""
        last = self.pieces[-1].index
        kept = (self._frame["_piece"].to_numpy() == last) | self._ancestor_mask(last)
        dropped = self._frame.loc[~kept]
        out = []
        for _, rows in dropped.groupby("_piece", sort=True):
            out.append({"segment": int(rows["segment"].iloc[0]), "first_step": int(rows["step"].min()),
                        "last_step": int(rows["step"].max())})
        return out


def check_resume(lineage: Lineage, index: int, *, config: AnalysisConfig | None = None) -> Resume | None:
    """Compare the loss (and LR) across the resume that starts piece `index`.

    Returns None for a piece that does not resume anything, or when the losses needed are missing.
    A loss that comes back more than `config.state_reset_fraction` of the way to the run's initial
    loss means the model (or optimizer) state was not restored, unless the resume's first loss (taken
    before its update, on the state as loaded) is still short of that: the state was loaded, and what
    threw the loss back came with the resume's first updates (an LR set too high at the resume).
    """
    config = config or AnalysisConfig()
    piece = lineage.pieces[index]
    if not piece.resumed:
        return None
    frame = lineage.frame(index)
    before = frame.loc[~frame["_own"]]
    after = frame.loc[frame["_own"]]
    if before.empty or after.empty or "loss" not in frame.columns:
        return None
    # The initial loss is known only when the lineage starts at the beginning of training.
    initial = _median(frame["loss"].head(_INITIAL_STEPS)) if int(frame["step"].iloc[0]) <= _INITIAL_STEPS else math.nan
    loss_before = _median(before["loss"].tail(_RESUME_STEPS))
    loss_after = _median(after["loss"].head(_RESUME_STEPS))
    resume = Resume(
        segment=piece.segment,
        step=piece.first_step,
        prev_step=int(before["step"].iloc[-1]),
        initial_loss=initial,
        loss_before=loss_before,
        loss_after=loss_after,
        back_fraction=math.nan,
    )
    if "lr" in frame.columns:
        resume.lr_before = float(before["lr"].iloc[-1])
        resume.lr_after = float(after["lr"].iloc[0])
    learned = initial - loss_before
    # The resume's first loss is measured before its update, on the state as loaded: a model that was
    # restored shows its trained loss there, whatever an LR set wrong at the resume does to the next steps.
    first = float(after["loss"].iloc[0])
    if math.isfinite(learned) and math.isfinite(loss_after) and learned > _MIN_LEARNED * abs(initial):
        resume.back_fraction = (loss_after - loss_before) / learned
        loaded = math.isfinite(first) and (first - loss_before) / learned < config.state_reset_fraction
        if resume.back_fraction >= config.state_reset_fraction and not loaded:
            resume.state_reset = True
            resume.evidence.append(
                f"at the resume at step {resume.step} (segment {resume.segment}) the loss went from "
                f"{fmt(loss_before)} to {fmt(loss_after)}, {resume.back_fraction:.0%} of the way back to its "
                f"initial {fmt(initial)}: the model state was not restored from the checkpoint"
            )
    elif not math.isfinite(initial):
        _log.debug("resume at step %d: the run's first steps are not recorded, no initial loss", piece.first_step)
    return resume


def moments_ratio(layers: pd.DataFrame, *, before_step: int, after_step: int) -> float | None:
    """Median over tensors of exp_avg_sq_mean just after a resume / just before it.

    A freshly created Adam state holds (1 - beta2) * g^2 after its first step, i.e. 0.05 or less of a
    trained state for beta2 >= 0.95, so a ratio below 0.1 means the moments were not restored.
    Returns None when the layer rows lack Adam statistics on either side.
    """
    if layers is None or layers.empty or "exp_avg_sq_mean" not in layers.columns:
        return None
    pre = layers.loc[layers["step"] <= before_step]
    post = layers.loc[layers["step"] >= after_step]
    if pre.empty or post.empty:
        return None
    pre = pre.loc[pre["step"] == pre["step"].max()].groupby("name", observed=True)["exp_avg_sq_mean"].last()
    post = post.loc[post["step"] == post["step"].min()].groupby("name", observed=True)["exp_avg_sq_mean"].last()
    both = pd.concat([pre.rename("pre"), post.rename("post")], axis=1).dropna()
    both = both.loc[both["pre"] > 0]
    if both.empty:
        return None
    return float(np.median(both["post"].to_numpy(dtype=float) / both["pre"].to_numpy(dtype=float)))


def _has_time(frame: pd.DataFrame) -> bool:
    return "time" in frame.columns and bool(np.isfinite(frame["time"].to_numpy(dtype=float)).all())


def _median(values: pd.Series) -> float:
    arr = finite(values.to_numpy(dtype=float))
    return float(np.median(arr)) if arr.size else math.nan
