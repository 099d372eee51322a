"""Scoring of `spikedoc.analyze` on the exam: each run's diagnosis against its labels, and the tables.

Per run: the incident that matches the fault (onset within `TOLERANCE` steps of the labelled onset
range), its cause, whether its verdict agrees with the twin on lasting damage, and whether its advice
is sane. Per half: cause rate per family, recall per family and damage band, alarms on clean runs,
damage agreement, advice sanity and the confusion matrix of causes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from bench._exam_design import CAUSE, MUST_FIND_DAMAGE, MUST_FIND_PEAK
from bench.spike_suite import TOLERANCE, match
from spikedoc.analysis.incident import CAUSES

__all__ = ["score_run", "tables"]

#: Advice that changes the optimisation, wrong for a non-finite value with no build-up.
_TUNING = ("lower_lr", "tighten_clip")


def _actions(incident: Any) -> list[str]:
    return [a["action"] for a in incident.recommendation.get("actions", [])]


def _insane(incident: Any, lab: dict[str, Any]) -> list[str]:
    """What is wrong in one incident's advice, given the run's labels (empty when sane)."""
    wrong, rec, actions = [], incident.recommendation, _actions(incident)
    if "load_state" in actions and lab["cause"] != "state_reset":
        wrong.append("state reload without a reset")
    if lab["family"] == "nonfinite" and any(a in _TUNING for a in actions):
        wrong.append("LR/clip advice for a non-finite value without build-up")
    if lab["family"] == "clean" or not rec.get("rollback"):
        return wrong
    right = lab["rollback"]
    if rec.get("rollback_to_step") is not None and rec["rollback_to_step"] > right["step"]:
        wrong.append(f"rollback to step {rec['rollback_to_step']}, after the onset ({right['step']})")
    named = rec.get("checkpoint_path")
    last_write = {path: step for step, path in lab["checkpoints"]}
    if named is not None and last_write.get(named, -1) > right["step"]:
        wrong.append(f"names {named.rsplit('/', 1)[-1]}, overwritten at step {last_write[named]}")
    return wrong


def score_run(lab: dict[str, Any], diagnosis: Any) -> dict[str, Any]:
    """One run's diagnosis scored against its labels (a clean run: its alarms only).

    Returns:
        `family`, `band`, `cause` (label), `found`, `got` (matched incident's cause, `missed` when none),
        `said_damaged` (an incident from the onset on has a verdict other than `recovered`),
        `twin_damaged`, `insane` (sentences), `alarm` (worst severity on a clean run, else None),
        `exact_rollback` (the matched rollback names the right step or file), `incidents`.
    """
    incidents = list(diagnosis.incidents)
    out: dict[str, Any] = {"family": lab["family"], "kind": lab["kind"], "band": lab["band"], "cause": lab["cause"],
                           "twin_diverged": lab.get("twin_diverged", False),
                           "incidents": [(i.onset_step, i.cause, i.severity, i.verdict) for i in incidents]}  # fmt: skip
    if lab["family"] == "clean":
        order = ("minor", "moderate", "severe")
        out.update(alarm=max((i.severity for i in incidents), key=order.index, default=None),
                   said_damaged=any(i.verdict != "recovered" for i in incidents), twin_damaged=False,
                   insane=[w for i in incidents for w in _insane(i, lab)])  # fmt: skip
        return out
    found = match({"onset_range": lab["onset_range"]}, incidents, TOLERANCE)
    after = [i for i in incidents if i.onset_step >= lab["onset_range"][0] - TOLERANCE]
    rec = found.recommendation if found is not None else {}
    right = lab["rollback"]
    exact = None
    if rec.get("rollback"):  # with checkpoints, the right file (None when every one was overwritten); else the step
        exact = rec.get("checkpoint_path") == right["checkpoint"] if lab["checkpoints"] else rec.get("rollback_to_step") == right["step"]
    out.update(
        found=found is not None,
        got=found.cause if found is not None else "missed",
        said_damaged=any(i.verdict != "recovered" for i in after),
        twin_damaged=lab["damage"] >= MUST_FIND_DAMAGE,
        insane=[w for i in after for w in _insane(i, lab)],
        alarm=None,
        exact_rollback=exact,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ tables


def _rate(hits: int, n: int) -> str:
    return f"{hits}/{n} ({100 * hits / n:.0f}%)" if n else "0/0"


def _cause_table(rows: list[dict[str, Any]]) -> list[str]:
    families = list(CAUSE)
    lines = ["| family (cause) | runs | visible effect | right cause (of visible) | right cause (of must-find) |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for fam in families:
        runs = [r for r in rows if r["family"] == fam]
        seen = [r for r in runs if r["band"] != "none"]
        must = [r for r in runs if r["band"] == "must_find"]
        lines.append(f"| {fam} ({CAUSE[fam]}) | {len(runs)} | {len(seen)} | {_rate(sum(r['got'] == r['cause'] for r in seen), len(seen))} "
                     f"| {_rate(sum(r['got'] == r['cause'] for r in must), len(must))} |")  # fmt: skip
    return lines


def _recall_table(rows: list[dict[str, Any]]) -> list[str]:
    bands = ("must_find", "small", "none")
    lines = ["| family | must-find: found | small effect: found | no visible effect: found |", "| --- | ---: | ---: | ---: |"]
    for fam in CAUSE:
        cells = []
        for band in bands:
            runs = [r for r in rows if r["family"] == fam and r["band"] == band]
            cells.append(_rate(sum(r["found"] for r in runs), len(runs)))
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return lines


def _confusion(rows: list[dict[str, Any]]) -> list[str]:
    said = [c for c in CAUSES if any(r["got"] == c for r in rows)] + ["missed"]
    lines = ["| true cause \\ analyze | " + " | ".join(said) + " |", "| --- |" + " ---: |" * len(said)]
    for cause in dict.fromkeys(CAUSE.values()):
        counts = Counter(r["got"] for r in rows if r["cause"] == cause)
        lines.append(f"| {cause} | " + " | ".join(str(counts.get(c, 0) or "") for c in said) + " |")
    return lines


def _worst_family(must: list[dict[str, Any]]) -> tuple[int, int, str]:
    """(right, runs, family) of the family with the lowest right-cause share among must-find runs."""
    per = [(sum(r["got"] == r["cause"] for r in runs), len(runs), fam)
           for fam in CAUSE if (runs := [r for r in must if r["family"] == fam])]  # fmt: skip
    return min(per, key=lambda p: p[0] / p[1], default=(0, 0, "none"))


def tables(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The markdown of one half's scores and its headline numbers.

    Args:
        rows: `score_run` results of the half's runs (clean and faulty); the runs of a base whose
            clean twin diverged by itself are left out (no clean reference), and counted.
    """
    unreferenced = [r for r in rows if r.get("twin_diverged")]
    rows = [r for r in rows if not r.get("twin_diverged")]
    faulty = [r for r in rows if r["family"] != "clean"]
    clean = [r for r in rows if r["family"] == "clean"]
    seen = [r for r in faulty if r["band"] != "none"]
    must = [r for r in faulty if r["band"] == "must_find"]
    alarms = Counter(r["alarm"] for r in clean)
    agree = [r for r in rows if r["said_damaged"] == r["twin_damaged"]]
    insane = [r for r in rows if r["insane"]]
    exact = [r for r in faulty if r.get("exact_rollback") is not None]
    head = {
        "runs": len(rows), "clean": len(clean), "faulty": len(faulty),
        "cause_visible": (sum(r["got"] == r["cause"] for r in seen), len(seen)),
        "recall_must_find": (sum(r["found"] for r in must), len(must)),
        "clean_alarms": (alarms["moderate"] + alarms["severe"], len(clean)),
        "clean_quiet": (len(clean) - alarms["moderate"] - alarms["severe"], len(clean)),
        "cause_worst_family": _worst_family(must),
        "clean_severe": (alarms["severe"], len(clean)),
        "damage_agrees": (len(agree), len(rows)),
        "advice_sane": (len(rows) - len(insane), len(rows)),
        "exact_rollback": (sum(r["exact_rollback"] for r in exact), len(exact)),
    }  # fmt: skip
    lines = [
        f"Runs: {len(rows)} ({len(clean)} clean, {len(faulty)} faulty; {len(seen)} with a visible effect, "
        f"{len(must)} must-find: >= {MUST_FIND_DAMAGE:.0%} lasting damage, a >= {MUST_FIND_PEAK}x loss peak or non-finite).",
        "",
        f"Left out: {len(unreferenced)} runs of {sum(r['family'] == 'clean' for r in unreferenced)} base setups whose clean "
        "twin diverged by itself (after its warmup, a loss above the untrained model's or non-finite): with no clean "
        "reference, neither the twin's alarm nor the faults' labels can be scored.",
        "",
        f"- Right cause, faulty runs with a visible effect: {_rate(*head['cause_visible'])}",
        f"- Must-find faults found: {_rate(*head['recall_must_find'])}",
        f"- Clean runs with a moderate or severe incident: {_rate(*head['clean_alarms'])} "
        f"(severe: {head['clean_severe'][0]}; minor only: {alarms['minor']}; none: {alarms[None]})",
        f"- Damage verdict agrees with the twin's held-out eval (damaged: >= {MUST_FIND_DAMAGE:.0%}): {_rate(*head['damage_agrees'])}",
        f"- Advice sane: {_rate(*head['advice_sane'])}",
        f"- Rollback names the right step (no checkpoints) or the right file (checkpoints), when advised: {_rate(*head['exact_rollback'])}",
        "",
        *_cause_table(faulty),
        "",
        *_recall_table(faulty),
        "",
        "Confusion matrix of causes (faulty runs with a visible effect; `missed`: no incident matched):",
        "",
        *_confusion(seen),
    ]
    problems = Counter(w.split(",")[0].split(" to step")[0] for r in insane for w in r["insane"])
    if problems:
        lines += ["", "Insane advice, by kind (incidents): " + "; ".join(f"{k}: {n}" for k, n in problems.most_common())]
    disagreements = defaultdict(int)
    for r in rows:
        if r["said_damaged"] != r["twin_damaged"]:
            disagreements["said damaged, twin not" if r["said_damaged"] else "twin damaged, said not"] += 1
    if disagreements:
        lines += ["", "Damage disagreements: " + "; ".join(f"{k}: {n}" for k, n in disagreements.items())]
    return lines, head
