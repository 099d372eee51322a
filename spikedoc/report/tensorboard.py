"""Export a run to TensorBoard event files: step scalars, per-tensor series grouped by module, incidents as text."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._meta import parameter_modules
from spikedoc.analysis.attribution import module_kinds
from spikedoc.analysis.diagnosis import Diagnosis
from spikedoc.report.terminal import action_text
from spikedoc.store.tensorboard_mirror import LAYER_METRICS, STEP_TAGS

__all__ = ["export_tensorboard", "STEP_TAGS", "LAYER_METRICS"]

logger = logging.getLogger(__name__)

# Steps of the layer table read at once: bounded memory on runs of millions of steps.
_LAYER_CHUNK = 20_000


def export_tensorboard(run: Any, diagnosis: Diagnosis, logdir: str | Path) -> dict[str, int]:
    """Write `run` (a loaded `spikedoc.Run`) and its `diagnosis` as TensorBoard events under `logdir`.

    Step scalars go to `train/<column>`; per-tensor gradient norm, update/weight ratio and Adam eps
    fraction to `<module kind>.<metric>/<tensor>`; each incident is a text summary
    (`incidents/<n>`) at its onset step, and the configuration findings one text at the first step.
    A multi-rank run is exported from its lowest rank.

    Args:
        run: The loaded run.
        diagnosis: `spikedoc.analyze(run)`.
        logdir: Folder for the event file (created; existing event files are left alone).

    Returns:
        Counts: `scalars` (points written), `tags`, `texts`.

    Example:
        >>> import spikedoc
        >>> run = spikedoc.load("sample_runs/lr_surge")  # doctest: +SKIP
        >>> export_tensorboard(run, spikedoc.analyze(run), "tb/lr_surge")  # doctest: +SKIP
        {'scalars': 21300, 'tags': 71, 'texts': 2}
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    steps = _lowest_rank(run.steps)
    wall = _wall_times(steps)
    counts = {"scalars": 0, "tags": 0, "texts": 0}
    tags: set[str] = set()
    writer = EventFileWriter(str(logdir))
    try:
        columns = [c for c in STEP_TAGS if c in steps.columns]
        values = {c: pd.to_numeric(steps[c], errors="coerce").to_numpy(np.float64) for c in columns}
        for i, step in enumerate(steps["step"].to_numpy()):
            points = [Summary.Value(tag=f"train/{c}", simple_value=values[c][i]) for c in columns if not math.isnan(values[c][i])]
            if points:
                writer.add_event(Event(wall_time=wall.get(int(step), time.time()), step=int(step), summary=Summary(value=points)))
                counts["scalars"] += len(points)
                tags.update(p.tag for p in points)
        for step, points in _layer_points(run, Summary):
            writer.add_event(Event(wall_time=wall.get(step, time.time()), step=step, summary=Summary(value=points)))
            counts["scalars"] += len(points)
            tags.update(p.tag for p in points)
        first = int(steps["step"].min()) if len(steps) else 0
        for n, (inc, text) in enumerate(_incident_texts(diagnosis), 1):
            summary = text_pb(f"incidents/{n}", text)
            writer.add_event(Event(wall_time=wall.get(inc.onset_step, time.time()), step=inc.onset_step, summary=summary))
            counts["texts"] += 1
        if diagnosis.findings:
            text = "\n".join(f"- **{f.severity}** `{f.id}`: {f.message}" for f in diagnosis.findings)
            writer.add_event(Event(wall_time=wall.get(first, time.time()), step=first, summary=text_pb("findings", text)))
            counts["texts"] += 1
    finally:
        writer.close()
    counts["tags"] = len(tags)
    logger.info("spikedoc: wrote %d scalars under %d tags and %d texts to %s", counts["scalars"], counts["tags"], counts["texts"], logdir)
    return counts


def _layer_points(run: Any, summary_type: Any):
    """(step, [Summary.Value]) per step of the layer table, read in windows of `_LAYER_CHUNK` steps."""
    if not getattr(run, "has_layers", False) or run.steps.empty:
        return
    modules = parameter_modules(run.meta)
    kinds: dict[str, str] = {}
    first, last = int(run.steps["step"].min()), int(run.steps["step"].max())
    lowest = int(run.steps["rank"].min()) if "rank" in run.steps.columns else 0
    for start in range(first, last + 1, _LAYER_CHUNK):
        window = run.layers(start, min(start + _LAYER_CHUNK - 1, last), columns=list(LAYER_METRICS))
        if window.empty:
            continue
        if "rank" in window.columns:
            window = window[window["rank"] == lowest]
        names = [str(n) for n in window["name"].unique() if str(n) not in kinds]
        kinds.update(module_kinds(names, modules))
        metrics = [m for m in LAYER_METRICS if m in window.columns]
        frame = window.assign(name=window["name"].astype(str)).drop_duplicates(["step", "name"], keep="last")
        for step, rows in frame.groupby("step", sort=True):
            points = []
            for metric in metrics:
                for name, value in zip(rows["name"], pd.to_numeric(rows[metric], errors="coerce")):
                    if not math.isnan(value):
                        points.append(summary_type.Value(tag=f"{kinds[name]}.{metric}/{name}", simple_value=value))
            if points:
                yield int(step), points


def _incident_texts(diagnosis: Diagnosis):
    """(incident, markdown) for each incident: what, verdict, cause with evidence, what to do."""
    for inc in diagnosis.incidents:
        lines = [
            f"**{inc.kind}** at step {inc.onset_step} (peak {inc.peak_step}, end {inc.end_step}): "
            f"severity **{inc.severity}**, verdict **{inc.verdict}**, cause **{inc.cause}**"
            + (" (guessed)" if inc.cause_guessed else ""),
            "",
            *(f"- {sentence}" for sentence in inc.evidence),
        ]
        actions = inc.recommendation.get("actions", [])
        if actions:
            lines += ["", "What to do:", *(f"1. {action_text(a)} (because {a.get('because', '')})" for a in actions)]
        yield inc, "\n".join(lines)


def _lowest_rank(steps: pd.DataFrame) -> pd.DataFrame:
    if "rank" in steps.columns and len(steps) and steps["rank"].nunique() > 1:
        steps = steps[steps["rank"] == steps["rank"].min()]
    return steps


def _wall_times(steps: pd.DataFrame) -> dict[int, float]:
    if "time" not in steps.columns:
        return {}
    times = pd.to_numeric(steps["time"], errors="coerce")
    ok = np.isfinite(times.to_numpy(np.float64))
    return dict(zip(steps["step"].to_numpy()[ok].tolist(), times.to_numpy(np.float64)[ok].tolist()))
