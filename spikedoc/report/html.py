"""One self-contained HTML page for a run: summary, findings, plots with incidents shaded, each incident explained.

The page has no script and loads nothing: plots are PNGs inlined as data URIs, styles are inline,
and every string that comes from the run (paths, tensor names, sample ids, metadata, evidence) is
HTML-escaped, so a report of someone else's run is safe to open.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._meta import optimizer_name
from spikedoc.analysis._robust import count, fmt, fmt_steps
from spikedoc.analysis.diagnosis import Diagnosis
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.lints import LINTS
from spikedoc.errors import one_line
from spikedoc.report._numbers import peak_text, ratio_text, severity_order, table_number
from spikedoc.report import plots
from spikedoc.report.plots import SEVERITY_COLORS, Span
from spikedoc.report.guard_words import action_line
from spikedoc.report.terminal import action_text, context_items, run_findings, settled_text

__all__ = ["render_html", "GUARD_MARKS", "MAX_DETAILED"]

logger = logging.getLogger(__name__)

#: Guard actions drawn as dashed lines on the plots (its periodic checkpoints are only counted).
GUARD_MARKS = ("veto", "rollback", "guard_stop")
#: Incidents explained with their own plots (the most severe first); the others are in the table.
MAX_DETAILED = 12
# Steps shown before onset in the heatmap, and the per-tensor history read before those.
_HEAT_BEFORE, _HEAT_HISTORY, _HEAT_AFTER = 30, 200, 15
# Implicated tensors whose update/weight ratio and eps fraction are drawn.
_LINES = 5

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1000px;padding:18px;color:#1d1d1f}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:16px;margin:0 0 6px}.muted{color:#666}.mono{font-family:ui-monospace,Menlo,monospace;font-size:12px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{font-weight:600;background:#fafafa}.num{text-align:right}img{max-width:100%;display:block;margin:6px 0}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600;color:#1d1d1f}
.incident{border:1px solid #ddd;border-radius:8px;padding:12px 14px;margin:16px 0}
.verdict{font-size:16px;margin:8px 0}li{margin:2px 0}.because{color:#555;font-size:13px}
.warning{color:#9a6700}.info{color:#0b6e99}.good{color:#1a7f37}
"""


def render_html(run: Any, diagnosis: Diagnosis, *, buckets: int = 1500) -> str:
    """The report page of `run` (a loaded `spikedoc.Run`) and its `diagnosis`, as one HTML string.

    Args:
        run: The loaded run (for the step, layer and event tables).
        diagnosis: `spikedoc.analyze(run)`.
        buckets: Points per series on the overview; a longer run is drawn as a min/max envelope.

    Returns:
        A complete HTML document with no external reference.

    Example:
        >>> import spikedoc
        >>> run = spikedoc.load("sample_runs/lr_surge")  # doctest: +SKIP
        >>> page = render_html(run, spikedoc.analyze(run))  # doctest: +SKIP
        >>> Path("report.html").write_text(page)  # doctest: +SKIP
    """
    steps = _plotted_steps(run.steps)
    guard = _guard_actions(diagnosis)
    marks = [(a["step"], a["kind"]) for a in guard
             if a.get("kind") in GUARD_MARKS and isinstance(a.get("step"), (int, np.integer))]
    detailed = _most_severe(diagnosis.incidents, MAX_DETAILED)
    # Every incident is shaded; only those explained below are labelled (95 labels would be a smear).
    spans = [Span(i.onset_step, i.end_step, i.severity, f"#{n}" if n - 1 in detailed else "")
             for n, i in enumerate(diagnosis.incidents, 1)]
    parts = [
        _header(diagnosis, run.meta if isinstance(getattr(run, "meta", None), dict) else {}),
        _holes(diagnosis),
        _summary(diagnosis, detailed),
        _overview(steps, spans, marks, buckets),
        _findings(diagnosis),
        _guard_section(guard),
    ]
    for n, (inc, ctx) in enumerate(zip(diagnosis.incidents, diagnosis.context), 1):
        if n - 1 in detailed:
            parts.append(_incident_section(run, steps, n, inc, ctx, marks))
    parts.append(_missing(diagnosis))
    parts.append(_spike_score(diagnosis))
    title = f"spikedoc report: {diagnosis.path}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>\n'
        f"<body>\n{''.join(p for p in parts if p)}\n</body></html>\n"
    )


# ------------------------------------------------------------------------------ page sections


def _header(d: Diagnosis, meta: dict[str, Any]) -> str:
    s = d.summary
    facts = [f"{d.source} run", f"{s.get('steps', 0):,} steps {s.get('first_step', '?')}..{s.get('last_step', '?')}"]
    if s.get("ranks", 1) > 1:
        facts.append(f"{s['ranks']} ranks")
    if s.get("segments", 1) > 1:
        facts.append(f"{s['segments']} segments")
    from spikedoc import __version__

    return (f"<header><h1>spikedoc report</h1><div class='mono'>{_e(d.path)}</div>"
            f"<div class='muted'>{_e(', '.join(facts + _setup(meta)))} &middot; spikedoc {_e(__version__)}</div></header>\n")


def _setup(meta: dict[str, Any]) -> list[str]:
    """The model and optimizer as meta.json names them (spikedoc runs only)."""
    out = []
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if model.get("class"):
        size = model.get("num_parameters")
        out.append(f"model {model['class']}" + (f" ({size:,} parameters)" if isinstance(size, int) else ""))
    name = optimizer_name(meta)
    if name:
        out.append(f"optimizer {name}")
    return out


def _summary(d: Diagnosis, detailed: set[int]) -> str:
    if d.healthy:
        headline = "<p class='verdict good'>No incidents: no spike, non-finite value or divergence found.</p>"
        return f"<section id='summary'><h2>Summary</h2>{headline}</section>\n"
    counts = {sev: sum(i.severity == sev for i in d.incidents) for sev in ("severe", "moderate", "minor")}
    said = ", ".join(f"{n} {sev}" for sev, n in counts.items() if n)
    attention = "needs attention" if d.needs_attention else settled_text(d)
    rows = []
    for n, inc in enumerate(d.incidents, 1):
        number = f"<a href='#incident-{n}'>#{n}</a>" if n - 1 in detailed else f"#{n}"
        rows.append(
            f"<tr><td>{number}</td><td>{_badge(inc.severity)}</td><td>{_e(inc.kind)}</td>"
            f"<td class='num'>{inc.onset_step}</td><td class='num'>{inc.end_step}</td>"
            f"<td class='num'>{_e(table_number(inc.magnitude_sigma))}</td><td class='num'>{_e(ratio_text(inc.peak_ratio))}</td>"
            f"<td>{_e(inc.verdict)}</td><td>{_e(inc.cause)}{'?' if inc.cause_guessed else ''}</td></tr>"
        )
    table = ("<table><tr><th>#</th><th>severity</th><th>kind</th><th>onset</th><th>end</th>"
             "<th title='peak size in robust standard deviations of the baseline'>sigma</th>"
             "<th title='peak value over the baseline'>peak/base</th><th>verdict</th><th>cause</th></tr>"
             + "".join(rows) + "</table>")
    legend = ("<p class='muted'>sigma: the peak's distance from the rolling baseline in robust standard deviations; "
              "peak/base: the peak value over the baseline; a cause with ? rests on the loss's shape alone.</p>")
    head = f"<p class='verdict'><b>{len(d.incidents)} incident{'s' if len(d.incidents) != 1 else ''}</b> ({_e(said)}): {attention}.</p>"
    if len(d.incidents) <= MAX_DETAILED:
        return f"<section id='summary'><h2>Summary</h2>{head}{table}{legend}</section>\n"
    # A long table would push the plots off the first screen: it folds (an HTML element, no script).
    more = (f"<p class='muted'>The {MAX_DETAILED} most severe incidents are explained below; "
            f"<code>spikedoc analyze --json</code> has all {len(d.incidents)}.</p>")
    return (f"<section id='summary'><h2>Summary</h2>{head}{more}<details><summary>all {len(d.incidents)} incidents"
            f"</summary>{table}{legend}</details></section>\n")


def _spike_score(d: Diagnosis) -> str:
    shown = [f"{k} {100 * v:.3f}%" for k, v in d.spike_score.items() if v is not None and math.isfinite(v)]
    if not shown:
        return ""
    # At the end, labelled as what it is: a whole-run rate computed the OLMo 2 way, not the detector's
    # judgement; next to a large incident a bare "loss 0.000%" would read as a contradiction.
    return ("<section id='spike-score'><p class='muted'>OLMo 2 spike score, a whole-run rate (share of steps more "
            "than 7 standard deviations above the mean of the previous 1,000, spikes included, so early or "
            f"repeated spikes raise the bar): {_e(', '.join(shown))}.</p></section>\n")


def _overview(steps: pd.DataFrame, spans: list[Span], marks: list[tuple[int, str]], buckets: int) -> str:
    if not plots.panels_with_data(steps):
        return "<section id='overview'><h2>Over the whole run</h2><p>No series to plot.</p></section>\n"
    png = plots.overview_png(steps, spans, marks, buckets=buckets)
    reduced = len(steps) > 2 * buckets
    note = (f" Each of the {buckets:,} columns spans ~{len(steps) // buckets:,} steps and shows their min..max, "
            "so no spike is averaged away." if reduced else "")
    legend = " ".join(f"{_badge(sev)}" for sev in SEVERITY_COLORS)
    guard = " Dashed lines: guard actions." if marks else ""
    return (f"<section id='overview'><h2>Over the whole run</h2>{_img(png, 'loss, grad norm, LR and clip coefficient over the run')}"
            f"<p class='muted'>Incidents shaded by severity: {legend}.{guard}{note}</p></section>\n")


def _findings(d: Diagnosis) -> str:
    if not d.findings:
        return ""
    groups = (("In the run", run_findings(d)), ("Configuration", [f for f in d.findings if f.id in LINTS]))
    body = "".join(f"<h3>{title}</h3><ul>{''.join(_finding(f) for f in found)}</ul>" for title, found in groups if found)
    return f"<section id='findings'><h2>Findings</h2>{body}</section>\n"


def _finding(f: Any) -> str:
    return (f"<li><span class='{_e(f.severity)}'>{_e(f.severity)}</span> <b>{_e(f.id)}</b>: {_e(f.message)}"
            f"<div class='because'>why: {_e(f.why)}</div></li>")


def _guard_section(actions: list[dict[str, Any]]) -> str:
    if not actions:
        return ""
    checkpoints = sum(a.get("kind") == "checkpoint" for a in actions)
    # The terminal's sentence for each action (its cause included): one voice in both reports.
    rows = "".join(
        f"<tr><td class='num'>{_e(a.get('step', ''))}</td><td>{_e(a.get('kind', ''))}</td>"
        f"<td>{_e(action_line(a))}</td></tr>" for a in actions if a.get("kind") != "checkpoint"
    )
    table = (f"<table><tr><th>step</th><th>action</th><th>what it did</th></tr>{rows}</table>" if rows else "")
    return (f"<section id='guard'><h2>What the guard did</h2><p class='muted'>{_e(count(checkpoints, 'guard checkpoint'))}; "
            f"a rollback's step is the step it returned to.</p>{table}</section>\n")


def _incident_section(run: Any, steps: pd.DataFrame, n: int, inc: Incident, ctx: dict[str, Any],
                      marks: list[tuple[int, str]]) -> str:
    pad = max(30, 2 * (inc.end_step - inc.onset_step))
    zoom = plots.window_png(steps, inc.onset_step - pad, inc.end_step + pad, Span(inc.onset_step, inc.end_step, inc.severity, f"#{n}"), marks)
    segment = f" (segment {ctx['segment']})" if ctx.get("segment") else ""
    body = [
        f"<h3>#{n} {_e(inc.kind)} at step {inc.onset_step}{segment} {_badge(inc.severity)}"
        + (" <span class='good'>handled by the guard</span>" if getattr(inc, "handled_by_guard", False) else "") + "</h3>",
        f"<p>{_e(inc.metric)} {_e(fmt(inc.peak_value))} at step {inc.peak_step} against a baseline of "
        f"{_e(fmt(inc.baseline))} ({_e(peak_text(inc.peak_ratio, inc.magnitude_sigma))})"
        + (" <span class='warning'>(short history: low confidence)</span>" if inc.low_confidence else "") + "</p>",
        _verdict(inc),
        _cause(inc),
        _actions(inc),
        _img(zoom, f"incident {n}: the steps around it"),
        _layer_plots(run, inc),
        _batches(inc),
        _context(inc, ctx),
    ]
    return (f"<section class='incident' id='incident-{n}' data-severity='{_e(inc.severity)}' "
            f"data-onset='{inc.onset_step}' data-end='{inc.end_step}'>{''.join(b for b in body if b)}</section>\n")


def _verdict(inc: Incident) -> str:
    text = f"verdict: <b>{_e(inc.verdict)}</b>"
    if inc.recovered and inc.recovery_step is not None:
        text += f", back on its trajectory from step {inc.recovery_step}"
    elif inc.verdict == "rolled_back":
        text += ": the guard vetoed every step from onset and rolled back, so no update of this stretch was applied"
    damage = inc.damage or {}
    excess = damage.get("excess_ratio")
    if isinstance(excess, float) and math.isfinite(excess):
        text += (f"; damage: at step {_e(damage.get('damage_step'))} the loss is {100 * excess:+.1f}% "
                 f"({_e(table_number(damage.get('excess_sigma', math.nan)))} sigma) against its pre-incident trajectory")
    return f"<p>{text}</p>"


def _cause(inc: Incident) -> str:
    guessed = " <span class='warning'>(a guess: the run has no data to confirm it)</span>" if inc.cause_guessed else ""
    evidence = "".join(f"<li>{_e(sentence)}</li>" for sentence in inc.evidence)
    lead = (f"<p class='muted'>earliest precursor {count(inc.precursor_lead_steps, 'step')} before the loss flag</p>"
            if inc.precursor_lead_steps else "")
    return f"<p>cause: <b>{_e(inc.cause)}</b>{guessed}</p><ul>{evidence}</ul>{lead}"


def _actions(inc: Incident) -> str:
    actions = inc.recommendation.get("actions", [])
    if not actions:
        return ""
    items = "".join(f"<li>{_e(action_text(a))}<div class='because'>because {_e(a.get('because', ''))}</div></li>" for a in actions)
    return f"<div><b>What to do</b><ol>{items}</ol></div>"


def _layer_plots(run: Any, inc: Incident) -> str:
    if not getattr(run, "has_layers", False):
        return ""
    shown_from = inc.onset_step - _HEAT_BEFORE
    wanted = ["grad_norm", "update_ratio", "eps_frac"]
    try:
        layers = run.layers(shown_from - _HEAT_HISTORY, max(inc.peak_step, inc.onset_step) + _HEAT_AFTER, columns=wanted)
    except Exception as exc:  # a report must not die on one unreadable window: say so, on the page too, and go on
        logger.warning("spikedoc: no layer plots for the incident at step %s: %s", inc.onset_step, exc)
        return f"<p class='warning'>No per-tensor plots: the layer table could not be read here ({_e(one_line(exc))}).</p>"
    if layers.empty or "grad_norm" not in layers.columns:
        return ""
    leaders = [layer["name"] for layer in inc.layers]
    z = plots.gradient_z(layers, shown_from)
    out = [f"<h4>Per-tensor gradient norms around onset</h4>{_img(plots.heatmap_png(z, leaders, inc.onset_step), 'gradient-norm z-scores per tensor')}"
           "<p class='muted'>Robust z of log10(gradient norm) against each tensor's own previous "
           f"{_HEAT_HISTORY} steps; tensors marked &gt; led the incident.</p>"]
    names = leaders[:_LINES] or list(z.loc[inc.onset_step:].max().sort_values(ascending=False).index[:3])
    columns = [(c, label) for c, label in (("update_ratio", "update/weight ratio"), ("eps_frac", "Adam eps fraction"))
               if c in layers.columns and np.isfinite(pd.to_numeric(layers[c], errors="coerce")).any()]
    if names and columns:
        near = layers[layers["step"] >= shown_from]
        out.append(f"<h4>{'Implicated' if leaders else 'Most departed'} tensors</h4>"
                   + _img(plots.tensor_lines_png(near, names, columns, inc.onset_step), "update/weight ratio and eps fraction"))
    if inc.layers:
        rows = "".join(
            f"<tr><td class='mono'>{_e(layer['name'])}</td><td>{_e(layer.get('module', ''))}</td>"
            f"<td class='num'>{_e(table_number(layer.get('z', math.nan)))}</td><td class='num'>{_e(layer.get('departed_step', ''))}</td>"
            f"<td class='num'>{_e(layer.get('lead_steps') or '')}</td></tr>" for layer in inc.layers)
        out.append("<table><tr><th>tensor</th><th>module</th><th>z</th><th>departed at</th><th>steps ahead</th></tr>"
                   f"{rows}</table>")
    return "".join(out)


def _batches(inc: Incident) -> str:
    rows = []
    for batch in inc.batches:
        if not (batch.get("sample_ids") or batch.get("positions") or batch.get("batch_hash") or batch.get("stats")):
            continue  # an imported log knows nothing about its batches
        ids = batch.get("sample_ids") or []
        positions = batch.get("positions")
        who = fmt_steps(ids, 6) if ids else (f"positions {positions[0]}..{positions[1] - 1}" if positions else "")
        if positions and not ids and batch.get("positions_from") is not None:
            who += f" (counted from the resume at step {batch['positions_from']})"
        worst = "; ".join(f"{w['id']} ({fmt(w['loss'])})" for w in batch.get("worst_samples") or [])
        rank = f" rank {batch['rank']}" if batch.get("rank") else ""
        anomalies = "".join(f"<li>{_e(a)}</li>" for a in batch.get("anomalies") or [])
        rows.append(f"<tr><td class='num'>{_e(batch.get('step'))}{_e(rank)}</td><td class='mono'>{_e(who)}</td>"
                    f"<td>{'<ul>' + anomalies + '</ul>' if anomalies else '<span class=muted>none</span>'}</td>"
                    f"<td class='mono'>{_e(worst)}</td><td class='mono'>{_e(batch.get('batch_hash') or '')}</td></tr>")
    if not rows:
        return ""
    return ("<h4>Batches at onset</h4><table><tr><th>step</th><th>samples</th><th>anomalies</th>"
            f"<th>worst samples (loss)</th><th>content hash</th></tr>{''.join(rows)}</table>")


def _context(inc: Incident, ctx: dict[str, Any]) -> str:
    items = context_items(inc, ctx) + list(ctx.get("notes", []))
    if not items:
        return ""
    return "<p class='muted'>" + "; ".join(_e(i) for i in items) + "</p>"


def _holes(d: Diagnosis) -> str:
    """First, before any verdict: the steps the run lacks, which nothing below could see."""
    if not d.holes:
        return ""
    items = "".join(f"<li class='warning'>{_e(h['text'])}</li>" for h in d.holes)
    return (f"<section id='holes'><h2>Incomplete run</h2><p>{len(d.holes)} hole{'s' if len(d.holes) != 1 else ''}: "
            f"no incident is inferred across one, and the steps in a hole are not judged.</p><ul>{items}</ul></section>\n")


def _missing(d: Diagnosis) -> str:
    from spikedoc.report.terminal import MISSING_COST

    parts = []
    if d.missing:
        items = "".join(f"<li>{_e(m)}: {_e(MISSING_COST.get(m, 'not analysed'))}</li>" for m in d.missing)
        parts.append(f"<h2>Not in this run</h2><ul>{items}</ul>")
    if d.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warning'>{_e(w)}</li>" for w in d.warnings) + "</ul>")
    return f"<section id='missing'>{''.join(parts)}</section>\n" if parts else ""


# ------------------------------------------------------------------------------ data and helpers


def _plotted_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per step for the plots: the lowest rank's rows, and for a step recorded twice (a
    rollback redid it) the later row, which is the run that went on."""
    frame = steps
    if "rank" in frame.columns and frame["rank"].nunique() > 1:
        frame = frame[frame["rank"] == frame["rank"].min()]
    keep = [c for c in ("step", "loss", "grad_norm", "lr", "clip_coef") if c in frame.columns]
    frame = frame[keep].drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return frame.reset_index(drop=True)


def _guard_actions(diagnosis: Diagnosis) -> list[dict[str, Any]]:
    """What the guard did (`Diagnosis.guard_actions`: `kind`, `step`, `segment`, `detail`), oldest first."""
    return [a for a in getattr(diagnosis, "guard_actions", None) or [] if isinstance(a, dict)]


def _most_severe(incidents: list[Incident], limit: int) -> set[int]:
    return set(sorted(range(len(incidents)), key=lambda i: severity_order(incidents[i]))[:limit])


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _badge(severity: str) -> str:
    color = SEVERITY_COLORS.get(severity, "#cccccc")
    return f"<span class='badge' style='background:{color}'>{_e(severity)}</span>"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
