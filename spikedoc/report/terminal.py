"""Render a Diagnosis for the terminal with rich: incident table, explanations, lints, what was missing."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spikedoc.analysis._robust import count, fmt, fmt_step_ranges, fmt_steps
from spikedoc.analysis.diagnosis import Diagnosis
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.lints import LINTS
from spikedoc.report._numbers import peak_text, severity_order, sigma_text, table_number
from spikedoc.report.guard_words import action_line

__all__ = ["render", "action_text", "run_findings", "settled_text", "MAX_TABLE", "MAX_EXPLAINED", "MISSING_COST", "TABLE_LEGEND"]

#: Incidents listed in the table and explained in full; the rest are counted (all are in --json).
MAX_TABLE = 40
MAX_EXPLAINED = 8

#: What the incident table's columns mean, printed under it.
TABLE_LEGEND = ("onset/end: first and last flagged step; sigma: the peak's distance from the rolling baseline in "
                "robust standard deviations; verdict: the aftermath against the "
                "pre-incident trajectory; cause: what the evidence under each incident points to (a ? after it: a guess from the loss's shape alone); lead: steps by which the "
                "earliest precursor came before the loss was flagged")

# What each missing input costs the analysis, said next to it.
MISSING_COST = {
    "layers": "no per-tensor attribution or optimizer-state precursors",
    "batch fingerprints": "no batch attribution (sample ids, sequence lengths, repeated data)",
    "events": "checkpoints unknown: rollback steps are estimates",
    "grad_norm": "no gradient-norm detection or precursors",
    "lr": "no LR context (warmup, discontinuities, early-instability rule)",
}
_SEVERITY = {"warning": "yellow", "info": "cyan"}


def render(diagnosis: Diagnosis, console: Console | None = None) -> None:
    """Print `diagnosis` to `console` (stdout by default).

    Example:
        >>> from spikedoc.report.terminal import render
        >>> render(spikedoc.analyze("runs/exp1"))  # doctest: +SKIP
    """
    console = console or Console()
    s = diagnosis.summary
    console.print(
        f"[bold]{escape(diagnosis.path)}[/bold]  ({diagnosis.source}, {s.get('steps', 0)} steps "
        f"{s.get('first_step', '?')}..{s.get('last_step', '?')}"
        + (f", {s['ranks']} ranks" if s.get("ranks", 1) > 1 else "")
        + (f", {s['segments']} segments" if s.get("segments", 1) > 1 else "")
        + ")"
    )
    _holes(console, diagnosis.holes)
    if diagnosis.healthy:
        console.print("[green]No incidents: no spike, non-finite value or divergence found.[/green]")
    else:
        _table(console, diagnosis.incidents)
        order = sorted(range(len(diagnosis.incidents)), key=lambda i: severity_order(diagnosis.incidents[i]))
        for i in sorted(order[:MAX_EXPLAINED]):
            _explain(console, i + 1, diagnosis.incidents[i], diagnosis.context[i])
        if len(diagnosis.incidents) > MAX_EXPLAINED:
            console.print(f"[dim]{len(diagnosis.incidents) - MAX_EXPLAINED} more incidents not explained here "
                          "(the most severe are shown); --json has them all.[/dim]")
    if diagnosis.guard_actions:
        _guard(console, diagnosis.guard_actions)
    # What happened in the run (a state written, an LR jump, a resume) before what its settings risk.
    for title, findings in (("In the run", run_findings(diagnosis)),
                            ("Configuration", [f for f in diagnosis.findings if f.id in LINTS])):
        if findings:
            console.print()
            console.print(f"[bold]{title}[/bold]")
        for f in findings:
            color = _SEVERITY.get(f.severity, "white")
            console.print(f"  [{color}]{f.severity}[/{color}] {f.id}: {escape(f.message)}")
            console.print(f"    [dim]why: {escape(f.why)}[/dim]")
    if diagnosis.missing:
        console.print()
        console.print("[bold]Not in this run[/bold]")
        for item in diagnosis.missing:
            console.print(f"  {escape(item)}: {MISSING_COST.get(item, 'not analysed')}")
    for warning in diagnosis.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    _spike_score(console, diagnosis.spike_score)


def _holes(console: Console, holes: list[dict[str, Any]]) -> None:
    """First, before any verdict: what the run lacks, which no part of the report below can see."""
    if not holes:
        return
    console.print(f"[bold red]Incomplete run[/bold red]: {count(len(holes), 'hole')}; no incident is inferred across one, "
                  "and the steps in a hole are not judged.")
    for hole in holes[:MAX_TABLE]:
        console.print(f"  [red]hole[/red] {escape(hole['text'])}")
    if len(holes) > MAX_TABLE:
        console.print(f"  [dim]{len(holes) - MAX_TABLE} more holes (--json has them all)[/dim]")


def _spike_score(console: Console, score: dict[str, float | None]) -> None:
    # Last, and labelled as what it is: a whole-run rate computed the OLMo 2 way (every step, spikes
    # included, enters a rolling mean and standard deviation), not the detector's judgement above.
    # Next to a large incident, a bare "loss 0.000%" would read as a contradiction.
    shown = [f"{k} {_pct(v)}" for k, v in score.items() if v is not None]
    if shown:
        console.print()
        console.print(f"[dim]OLMo 2 spike score, a whole-run rate (share of steps more than 7 standard deviations "
                      f"above the mean of the previous 1,000, spikes included, so early or repeated spikes "
                      f"raise the bar): {', '.join(shown)}[/dim]")


def context_items(inc: Incident, ctx: dict[str, Any]) -> list[str]:
    """An incident's step-table context in short phrases (the LR at onset, the clipping), for every report."""
    items = []
    lr = ctx.get("lr_at_onset")
    if isinstance(lr, (int, float)) and math.isfinite(lr):
        items.append(f"LR at onset {fmt(lr)}")
    clip = ctx.get("clipping")
    if clip and clip.get("share", 0) > 0:
        items.append(f"clipped on {clip['share']:.0%} of the {count(clip['steps'], 'step')} before")
    if clip and clip.get("at_onset") is not None and clip["at_onset"] > 0:
        items.append(f"the clip scaled step {inc.onset_step}'s gradient by {fmt(clip['at_onset'])} "
                     f"(1/{table_number(1 / clip['at_onset'])})")
    return items


def _guard(console: Console, actions: list[dict[str, Any]]) -> None:
    """What spikedoc.Guard did: vetoes, rollbacks and a stop, one line each (checkpoints counted)."""
    console.print()
    checkpoints = sum(a["kind"] == "checkpoint" for a in actions)
    console.print(f"[bold]Guard actions[/bold] ({checkpoints} guard checkpoints)")
    shown = [a for a in actions if a["kind"] != "checkpoint"]
    for a in shown[:MAX_TABLE]:
        line = action_line(a)
        # The whole line is escaped: its details come from the run (a reason could hold rich markup).
        console.print(f"  [red]{escape(line)}[/red]" if a["kind"] == "guard_stop" else f"  {escape(line)}")
    if len(shown) > MAX_TABLE:
        console.print(f"[dim]... and {len(shown) - MAX_TABLE} more (see --json)[/dim]")


def _table(console: Console, incidents: list[Incident]) -> None:
    table = Table(title="Incidents", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # The peak/baseline ratio is in each incident's explanation: the table keeps to 80 columns.
    for column in ("#", "severity", "kind", "onset", "end", "sigma", "verdict", "cause", "lead"):
        # On a narrow terminal the verdict folds onto a second line; every other column keeps its width.
        words = column in ("kind", "verdict", "cause")
        table.add_column(column, justify="left" if words else "right", no_wrap=column != "verdict", overflow="fold",
                         min_width=10 if column == "verdict" else None)
    for i, inc in enumerate(incidents[:MAX_TABLE], 1):
        table.add_row(
            str(i), _SEVERITY_STYLE[inc.severity], inc.kind, str(inc.onset_step), str(inc.end_step),
            table_number(inc.magnitude_sigma),
            inc.verdict if inc.recovered or inc.handled_by_guard else f"[red]{inc.verdict}[/red]",
            inc.cause + ("?" if inc.cause_guessed else ""),
            "" if inc.precursor_lead_steps is None else str(inc.precursor_lead_steps),
        )
    console.print(table)
    console.print(f"[dim]{TABLE_LEGEND}[/dim]")
    if len(incidents) > MAX_TABLE:
        console.print(f"[dim]... and {len(incidents) - MAX_TABLE} more incidents (see --json)[/dim]")


def _explain(console: Console, number: int, inc: Incident, ctx: dict[str, Any]) -> None:
    console.print()
    segment = f" (segment {ctx['segment']})" if ctx.get("segment") else ""
    if inc.recovered and inc.recovery_step is None:  # the run ended before a recovery could hold
        state = "recovered (on its trajectory over the steps the run has after it)"
    elif inc.recovered:
        state = f"recovered (on its trajectory from step {inc.recovery_step})"
    elif inc.verdict == "rolled_back":
        state = "rolled back by the guard (no step after onset was applied)"
    else:
        state = f"[red]{inc.verdict}[/red]"
    console.print(
        f"[bold]#{number} {inc.kind}[/bold] at step {inc.onset_step}{segment}: {inc.metric} {fmt(inc.peak_value)} at step "
        f"{inc.peak_step} vs baseline {fmt(inc.baseline)} ({peak_text(inc.peak_ratio, inc.magnitude_sigma)}); {state}"
        + (" [yellow](short history: low confidence)[/yellow]" if inc.low_confidence else "")
    )
    console.print(f"  severity: {_SEVERITY_STYLE[inc.severity]}")
    damage = inc.damage
    if damage and math.isfinite(damage.get("excess_ratio", math.nan)):
        shift = ""
        if math.isfinite(damage.get("shift_z", math.nan)) and damage.get("shift_steps"):  # what the verdict rests on
            shift = (f"; over the {damage['shift_steps']} steps since it came back, {_pct_signed(damage['shift_ratio'])} "
                     f"on average ({table_number(damage['shift_z'])} standard errors)")
        console.print(f"  damage: at step {damage['damage_step']} the loss is {_pct_signed(damage['excess_ratio'])} "
                      f"({table_number(damage['excess_sigma'])} sigma) against its pre-incident trajectory{shift}")
    guessed = " [yellow](a guess: the run has no data to confirm it)[/yellow]" if inc.cause_guessed else ""
    console.print(f"  cause: [bold magenta]{inc.cause}[/bold magenta]{guessed}")
    for sentence in inc.evidence:
        console.print(f"    - {escape(sentence)}")
    for batch in inc.batches:
        known = batch["sample_ids"] or batch["positions"] or batch["batch_hash"] or batch["stats"]
        if known and (batch["anomalies"] or batch["step"] == inc.onset_step):
            ids = batch["sample_ids"]
            who = f"ids {escape(fmt_steps(ids, 4))}" if ids else (
                positions_text([batch["positions"]], batch.get("positions_from")) if batch["positions"] else "no ids")
            rank = f" rank {batch['rank']}" if batch.get("rank") else ""
            worst = batch.get("worst_samples") or []
            worst_text = f"; worst sample {escape(str(worst[0]['id']))} loss {fmt(worst[0]['loss'])}" if worst else ""
            console.print(f"  batch at step {batch['step']}{rank}: {who}{worst_text}")
    groups = [g for g in ctx.get("groups", []) if g["departed"]]
    if groups:
        parts = [f"{g['module']} {g['departed']}/{g['tensors']}" + (f" (led by {g['lead_steps']})" if g["lead_steps"] else "")
                 for g in groups]
        console.print(f"  tensors off their own history: {', '.join(parts)}")
        for layer in inc.layers[:3]:
            lead = f", {count(layer['lead_steps'], 'step')} ahead of the loss" if layer.get("lead_steps") else ""
            console.print(f"    {escape(layer['name'])} ({layer['module']}): z {sigma_text(layer['z'])}{lead}")
    context = context_items(inc, ctx)
    if inc.precursor_lead_steps:
        context.append(f"earliest precursor {count(inc.precursor_lead_steps, 'step')} before the loss flag")
    if context:
        console.print(f"  context: {'; '.join(context)}")
    for note in ctx.get("notes", []):
        console.print(f"  [dim]note: {escape(note)}[/dim]")
    for action in inc.recommendation.get("actions", []):
        console.print(f"  [green]->[/green] {escape(action_text(action))}")
        console.print(f"     [dim]because {escape(action['because'])}[/dim]")


def settled_text(diagnosis: Diagnosis) -> str:
    """Why a diagnosis with incidents needs no attention: nothing in them to act on, or a guard handled them.

    Example:
        >>> settled_text(Diagnosis(path="runs/x", source="csv"))
        'only minor incidents'
    """
    handled = any(i.handled_by_guard and i.severity != "minor" for i in diagnosis.incidents)
    others = [i for i in diagnosis.incidents if not i.handled_by_guard]
    quiet = "only minor incidents" if all(i.severity == "minor" for i in others) else "nothing to act on: the run recovered by itself"
    if handled and others:
        return "the guard handled the larger incidents, the others need nothing"
    return "handled by the guard" if handled else quiet


def positions_text(ranges: list[list[int]], since: int | None) -> str:
    """Stream positions `[a, b)` as `a..b-1`, said to count from a resume when the monitor's count began
    again there (`positions_from`: the resumed job gave `watch()` no `start_sample`)."""
    text = f"stream positions {', '.join(f'{a}..{b - 1}' for a, b in ranges)}"
    if since is None:
        return text
    return (f"{text}, counted from the resume at step {since} (the resumed job gave watch() no start_sample): "
            "add the position its data stood at then")


def action_text(action: dict[str, Any]) -> str:
    """One recommended action (`recommendation["actions"][i]`) as a sentence.

    Example:
        >>> action_text({"action": "tighten_clip", "max_norm": 1.0, "was": None, "because": "..."})
        'clip the gradient norm at 1 (no clipping was in use)'
    """
    kind = action["action"]
    if kind == "none":
        if action.get("advice_follows"):  # a broken schedule, device or batch is still to be dealt with
            return "no rollback needed: the run recovered by itself"
        return "no action needed: the run recovered by itself"
    if kind == "guard_handled":
        return "no action needed: the guard handled it"
    if kind == "guard_acted":
        return "the guard acted on part of it"
    if kind == "rollback":
        gone = "; ".join(f"{o['path']} was overwritten at step {o['overwritten_at']}" for o in action.get("overwritten") or [])
        if action["known"]:
            # A checkpoint event of step s holds the state before step s; the file may be named after s - 1.
            where = action["checkpoint"] or "the checkpoint"
            return f"roll back to {where} (the state before step {action['step']})" + (f" ({gone})" if gone else "")
        if gone:
            return (f"{gone}; no recorded checkpoint holds a state before step {action['step']}: roll back to a copy "
                    f"saved at or before step {action['step']} if you kept one, else retrain from the start")
        return f"roll back to your last checkpoint at or before step {action['step']} (no checkpoint events recorded)"
    if kind == "skip_data":
        what = (f"sample ids {fmt_steps(action['sample_ids'])}" if action["sample_ids"] else
                positions_text(action["positions"], action.get("positions_from")) if action["positions"] else
                "their samples")
        many = len(action["steps"]) != 1
        return f"skip the {'batches of steps' if many else 'batch of step'} {fmt_step_ranges(action['steps'])}: {what}"
    if kind == "lower_lr":
        return f"multiply the peak LR by {action['factor']:g} (from {fmt(action['peak_lr'])} to {fmt(action['new_peak_lr'])})"
    if kind == "tighten_clip":
        was = f"was {fmt(action['was'])}" if action["was"] else "no clipping was in use"
        return f"clip the gradient norm at {fmt(action['max_norm'])} ({was})"
    if kind == "reset_moments":
        return f"reset the optimizer moments of {fmt_steps(action['tensors'], 4)}"
    if kind == "find_state_writer":
        seen = action.get("seen", action["step"])
        when = f"between steps {action['step']} and {seen}" if seen > action["step"] else f"at step {action['step']}"
        return (f"find what wrote the optimizer state {when} (of {fmt_steps(action['tensors'], 4)}): "
                "a partial or wrong checkpoint load, or the loop editing optimizer.state; no LR or clipping change")
    if kind == "restore_scheduler":
        peak = f"; keep the peak LR at {fmt(action['peak_lr'])}" if action.get("peak_lr") else ""
        return f"restore the LR scheduler's state (its step count) with the checkpoint{peak}"
    if kind == "fix_schedule":
        peak = f" (the schedule's peak was {fmt(action['peak_lr'])})" if action.get("peak_lr") else ""
        if not action.get("replay", True):  # the run recovered: nothing is replayed, the schedule's code is fixed
            return (f"fix the LR schedule where it jumped at step {action['step']}: the LR there should have stayed "
                    f"near {fmt(action['hold_lr'])}{peak}")
        return (f"fix the LR schedule where it jumped at step {action['step']}: replay with the LR held at "
                f"{fmt(action['hold_lr'])}{peak}")
    if kind == "load_state":
        if action.get("at_resume") is not None or action.get("step") is None:
            return "resume with the model and optimizer state loaded from the checkpoint (check the load path and strict loading)"
        return (f"find what set the weights back at step {action['step']}, where no resume was recorded: the loop "
                "re-initialising them (a model.apply(init), reset_parameters()) or loading an early or wrong state_dict; "
                "no LR or clipping change")
    if kind == "check_rank":
        ranks = action.get("ranks") or []
        who = (f"rank {ranks[0]} fails" if len(ranks) == 1 else f"ranks {fmt_steps(ranks)} fail") if ranks else "it fails"
        # A loss scale was recorded: fp16 training (a GradScaler), whose range bf16 does not have to manage.
        fp16 = "; prefer bf16 over fp16" if action.get("loss_scaled") else ""
        return f"rerun from the checkpoint; if {who} again, take that device out{fp16}"
    return kind


_SEVERITY_STYLE = {"minor": "[dim]minor[/dim]", "moderate": "[yellow]moderate[/yellow]", "severe": "[red]severe[/red]"}


def _pct_signed(value: float) -> str:
    return f"{100 * value:+.1f}%"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.3f}%"


def run_findings(diagnosis: Any) -> list[Any]:
    """The findings about what happened in the run (not its configuration's lints)."""
    return [f for f in diagnosis.findings if f.id not in LINTS]
