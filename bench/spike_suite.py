"""The spike suite: tiny GPT runs on real text with planted faults, their labels, and a score of analyze.

    python bench/spike_suite.py generate [--out sample_runs] [--only NAME ...]
    python bench/spike_suite.py score [--runs sample_runs] [--no-write]

`generate` trains a ~50k-parameter byte-level GPT on CPU on Python's own documentation
(`pydoc_data.topics`), cleanly (four seeds) and once per planted fault, recording each run with
`spikedoc.watch(..., layer_every=1)`. Every faulty run shares the clean run's seed, initialisation and
data stream, so a faulty run is the clean run plus one fault; `labels.json` gives the fault as planted
and its effect measured against this clean twin (never what analyze reports). `score` runs
`spikedoc.analyze` on each run and writes the `spike_suite` section of BENCHMARKS.md.
Recipe, faults and scoring rules are explained in sample_runs/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, write_section
from spikedoc.demo.training import SPECS, Recipe, RunSpec, corpus, generate_run

__all__ = ["LABELS", "SPECS", "generate", "labels_for", "load_labels", "main", "score"]

_RUNS = Path(__file__).resolve().parent.parent / "sample_runs"
LABELS = "labels.json"
"""Name of the label file in each run directory of the suite."""



def _corpus_sha() -> str:
    return hashlib.sha256(corpus()).hexdigest()


# ------------------------------------------------------------------------------------ labels

#: A fault's effect starts where the run's loss leaves its clean twin's by this many noise sigmas.
_EFFECT_SIGMAS = 3.0
#: Steps after the planted step searched for the effect's peak.
_PEAK_WINDOW = 50
#: Gap (steps) that ends the stretch of steps the fault visibly affected.
_AFFECTED_GAP = 10


def _noise_sigma(clean: list[float], warmup: int) -> float:
    """Step-to-step loss noise of the clean run after warmup: MAD of first differences / sqrt(2)."""
    diffs = torch.tensor(clean[warmup:]).diff()
    return float(1.4826 * (diffs - diffs.median()).abs().median() / math.sqrt(2))


def labels_for(spec: RunSpec, record: dict[str, Any], clean: list[float], recipe: Recipe) -> dict[str, Any]:
    """The run's `labels.json`: the fault as planted and its effect measured against the clean twin.

    Args:
        spec: the run.
        record: what `generate_run` returned for it.
        clean: the clean run's recorded losses (same seed and data stream).
        recipe: the shared recipe.

    Returns:
        A JSON-able dict; `incidents` is empty for the clean run.

    Raises:
        RuntimeError: the planted fault never moved the loss measurably (it would be no spike).

    Example:
        >>> labels_for(SPECS[0], {"loss": [1.0], "planted": {}}, [1.0], Recipe())["incidents"]  # doctest: +SKIP
        []
    """
    import numpy as np  # the labels are plain numbers; numpy makes the NaN handling short

    out = {
        "name": spec.name,
        "description": spec.description,
        "fault": spec.fault,
        "seed": spec.seed,
        "steps": len(record["loss"]),
        "recipe": {k: getattr(recipe, k) for k in Recipe.__dataclass_fields__} | ({"bias": True} if spec.bias else {}),
        "twin": spec.twin if spec.fault else None,
        "generator": _environment(),
        "incidents": [],
    }
    if spec.fault is None:
        return out
    loss, base = np.asarray(record["loss"], dtype=float), np.asarray(clean, dtype=float)
    sigma = _noise_sigma(clean, recipe.warmup)
    excess = np.where(np.isfinite(loss), loss - base, np.inf)
    after = np.arange(spec.step, len(loss))
    off = [int(s) for s in after if abs(excess[s]) > _EFFECT_SIGMAS * sigma]
    if not off:
        raise RuntimeError(f"{spec.name}: the planted fault never moved the loss {_EFFECT_SIGMAS} sigmas off the clean run")
    end = off[0]
    for s in off[1:]:
        if s - end > _AFFECTED_GAP:
            break
        end = s
    window = excess[spec.step : spec.step + _PEAK_WINDOW]
    peak = spec.step + int(np.argmax(np.abs(window)))
    tail = excess[-20:]
    batch = spec.fault in ("constant_batch", "long_batch", "random_batch", "mixed_batch")
    out["incidents"].append({
        "cause": spec.cause,
        "planted_step": spec.step,
        "onset_range": [spec.step, off[0]],
        "peak_step": peak,
        "affected_range": [spec.step, end],
        "recovered": off[-1] == end < len(loss) - 1 - _AFFECTED_GAP,  # never 3 sigmas off again
        "batch_steps": record["planted"]["steps"] if batch else [],
        "sample_ids": record["planted"]["sample_ids"] if batch else [],
        "effect": {
            "loss_at_peak": _num(loss[peak]),
            "clean_loss_at_peak": _num(base[peak]),
            "noise_sigma": sigma,
            "excess_sigmas_at_peak": _num(excess[peak] / sigma),
            "final_excess": _num(tail.mean()),  # the lasting cost: mean loss above the twin, last 20 steps
        },
    })  # fmt: skip
    return out


def _num(value: float) -> float | str:
    return float(value) if math.isfinite(value) else str(float(value))


def _environment() -> dict[str, str]:
    """What exact reproduction depends on: the corpus (it ships with Python), torch and the CPU kernels."""
    return {
        "script": "bench/spike_suite.py",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "corpus_sha256": _corpus_sha(),
    }


def generate(out: Path = _RUNS, *, only: list[str] | None = None, checkpoint_dir: Path | None = None) -> list[dict[str, Any]]:
    """Regenerate the suite's runs (all, or those named in `only`) with their labels under `out`.

    Each faulty run's healthy twin (`RunSpec.twin`) is trained first: its labels are measured against it.
    """
    recipe = Recipe()
    wanted = [s for s in SPECS if only is None or s.name in only]
    by_name = {s.name: s for s in SPECS}
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        twins: dict[str, list[float]] = {}
        for name in dict.fromkeys(s.twin if s.fault else s.name for s in wanted):
            spec = by_name[name]
            run_dir = out / name if spec in wanted else Path(scratch) / name
            twins[name] = generate_run(spec, run_dir, recipe=recipe, checkpoint_dir=checkpoint_dir)["loss"]
        for spec in wanted:
            run_dir = out / spec.name
            twin = twins[spec.twin if spec.fault else spec.name]
            record = {"loss": twin, "planted": {}} if spec.fault is None else generate_run(
                spec, run_dir, recipe=recipe, checkpoint_dir=checkpoint_dir)  # fmt: skip
            labels = labels_for(spec, record, twin, recipe)
            (run_dir / LABELS).write_text(json.dumps(labels, indent=1) + "\n")
            written.append(labels)
    return written


# ------------------------------------------------------------------------------------ scoring

#: Steps by which an incident's onset may miss the labelled onset range and still match: the update
#: of step t first shows in the loss of step t+1, plus one step of slack for the detector's band.
TOLERANCE = 2


def load_labels(run_dir: str | Path) -> dict[str, Any]:
    """The parsed `labels.json` of one run of the suite."""
    return json.loads((Path(run_dir) / LABELS).read_text())


def match(label: dict[str, Any], incidents: list[Any], tolerance: int = TOLERANCE) -> Any | None:
    """The incident whose onset is within `tolerance` of the label's onset range (closest first)."""
    lo, hi = label["onset_range"]
    near = [i for i in incidents if lo - tolerance <= i.onset_step <= hi + tolerance]
    return min(near, key=lambda i: (max(lo - i.onset_step, i.onset_step - hi, 0), i.onset_step), default=None)


def batch_attributed(label: dict[str, Any], incident: Any) -> bool:
    """The incident names every planted batch step and every planted sample id."""
    steps = {int(b.get("step", -1)) for b in incident.batches}
    ids = {str(s) for b in incident.batches for s in (b.get("sample_ids") or [])}
    return set(label["batch_steps"]) <= steps and {str(s) for s in label["sample_ids"]} <= ids


def score_run(run_dir: Path) -> dict[str, Any]:
    """Analyze one run and compare its incidents with the labels."""
    import spikedoc

    labels = load_labels(run_dir)
    diagnosis = spikedoc.analyze(run_dir)
    incidents = list(diagnosis.incidents)
    rows, used = [], set()
    for label in labels["incidents"]:
        found = match(label, [i for i in incidents if id(i) not in used])
        if found is not None:
            used.add(id(found))
        rows.append({
            "label": label,
            "incident": found,
            "batch_ok": None if not label["batch_steps"] else bool(found and batch_attributed(label, found)),
            "cause_ok": bool(found and found.cause == label["cause"]),
        })  # fmt: skip
    others = [i for i in incidents if id(i) not in used]
    within = [i for i in others if any(lb["affected_range"][0] - TOLERANCE <= i.onset_step <= lb["affected_range"][1]
                                       for lb in labels["incidents"])]  # fmt: skip
    return {"name": labels["name"], "labels": labels, "rows": rows, "split": within,
            "false": [i for i in others if i not in within], "incidents": incidents}  # fmt: skip


def score(runs: Path = _RUNS) -> tuple[str, list[dict[str, Any]]]:
    """Score analyze on every run under `runs` that has a `labels.json`; returns (markdown, results)."""
    results = [score_run(d) for d in sorted(p.parent for p in runs.glob(f"*/{LABELS}"))]
    rows = [r for res in results for r in res["rows"]]
    found = [r for r in rows if r["incident"] is not None]
    batch = [r for r in rows if r["batch_ok"] is not None]
    total = sum(len(res["incidents"]) for res in results)
    good = len(found) + sum(len(res["split"]) for res in results)
    clean_false = sum(len(res["incidents"]) for res in results if not res["labels"]["incidents"])
    lines = [
        "## Spike suite: analyze on real tiny training runs with planted faults",
        "",
        (
            "Command: `python bench/spike_suite.py generate && python bench/spike_suite.py score` "
            "(runs and labels in `sample_runs/`, see sample_runs/README.md). `analyze` runs with its defaults; "
            f"an incident matches a label when its onset is within {TOLERANCE} steps of the labelled onset range."
        ),
        machine_line(),
        "",
        "| run | planted: step, cause | analyze: onset / peak, kind | cause | found | batch | cause ok | lead (steps) "
        "| verdict (final excess over twin) | severity | rollback | other incidents |",
        "| --- | --- | --- | --- | :---: | :---: | :---: | ---: | --- | --- | :---: | --- |",
    ]
    for res in results:
        extra = ", ".join(f"{i.onset_step} {i.kind} ({'in the fault window' if i in res['split'] else 'false'})"
                          for i in res["split"] + res["false"]) or "none"  # fmt: skip
        if not res["rows"]:
            lines.append(f"| {res['name']} | none | none | | | | | | | | | {extra} |")
        for r in res["rows"]:
            lb, inc = r["label"], r["incident"]
            got = f"{inc.onset_step} / {inc.peak_step}, {inc.kind}" if inc else "not found"
            lead = "" if inc is None or inc.precursor_lead_steps is None else str(inc.precursor_lead_steps)
            lines.append(
                f"| {res['name']} | {lb['planted_step']} (onset {lb['onset_range'][0]}-{lb['onset_range'][1]}, "
                f"peak {lb['peak_step']}), {lb['cause']} | {got} | {inc.cause if inc else ''} | {_mark(inc is not None)} "
                f"| {'n/a' if r['batch_ok'] is None else _mark(r['batch_ok'])} | {_mark(r['cause_ok'])} | {lead} "
                f"| {inc.verdict if inc else ''} ({_fmt(lb['effect']['final_excess'])}) | {inc.severity if inc else ''} "
                f"| {('yes' if inc.recommendation['rollback'] else 'no') if inc else ''} | {extra} |"
            )
    lines += [
        "",
        f"- Recall (planted incidents found): {len(found)}/{len(rows)}",
        f"- Precision (incidents that match a label or fall in a fault's affected window): {good}/{total}",
        f"- Batch attribution (planted steps and sample ids named): {sum(r['batch_ok'] for r in batch)}/{len(batch)}",
        f"- Cause accuracy: {sum(r['cause_ok'] for r in rows)}/{len(rows)}",
        f"- Incidents on the {sum(not r['labels']['incidents'] for r in results)} clean runs: {clean_false}",
        "- `final excess over twin` is the label's `final_excess`: the mean loss above the clean twin over the run's "
        "last 20 steps, in loss units (inf when the run stayed non-finite); the clean runs' step-to-step noise is 0.085.",
    ]
    for res in results:  # what a miss looked like, from the labels' own measurements
        for r in res["rows"]:
            if r["incident"] is None or not r["cause_ok"]:
                lb, eff = r["label"], r["label"]["effect"]
                said = ", ".join(f"{i.onset_step} {i.kind} ({i.cause})" for i in res["incidents"]) or "no incident"
                lines.append(
                    f"- {res['name']}: analyze reported {said}. Planted at step {lb['planted_step']}; the loss peaked at "
                    f"{_fmt(eff['loss_at_peak'])} at step {lb['peak_step']} against {_fmt(eff['clean_loss_at_peak'])} on "
                    f"the clean twin ({_fmt(eff['excess_sigmas_at_peak'])} noise sigmas of {_fmt(eff['noise_sigma'])})."
                )
        for inc in res["false"]:
            lines.append(
                f"- {res['name']}: false incident {inc.kind} at steps {inc.onset_step}-{inc.end_step} (cause {inc.cause}"
                f"{', low confidence' if inc.low_confidence else ''}): {inc.metric} peaked at {_fmt(inc.peak_value)} at "
                f"step {inc.peak_step} against a baseline of {_fmt(inc.baseline)}; no fault was planted in this run."
            )
    return "\n".join(lines) + "\n", results


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _explain(results: list[dict[str, Any]]) -> str:
    """Per run, what analyze reported (cause, evidence, batches), for reading next to the labels."""
    out = []
    for res in results:
        out.append(f"{res['name']}: {len(res['incidents'])} incident(s)")
        for inc in res["incidents"]:
            out.append(f"  onset {inc.onset_step} peak {inc.peak_step} end {inc.end_step} {inc.kind} "
                       f"{inc.magnitude_sigma:.1f} sigma, cause {inc.cause}, lead {inc.precursor_lead_steps}")  # fmt: skip
            out += [f"    evidence: {e}" for e in inc.evidence]
            out += [f"    batch {b.get('step')}: {len(b.get('sample_ids') or [])} ids; {'; '.join(b.get('anomalies', []))}"
                    for b in inc.batches]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: `generate` or `score` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="regenerate the runs and their labels")
    gen.add_argument("--out", type=Path, default=_RUNS, help="folder of the run directories")
    gen.add_argument("--only", nargs="+", choices=[s.name for s in SPECS], help="regenerate only these runs")
    gen.add_argument("--checkpoints", type=Path, default=None, help="checkpoint folder (default: a temp dir)")
    sc = sub.add_parser("score", help="analyze every labelled run and write BENCHMARKS.md")
    sc.add_argument("--runs", type=Path, default=_RUNS, help="folder of the run directories")
    sc.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    sc.add_argument("--explain", action="store_true", help="also print what analyze said about each incident")
    args = parser.parse_args(argv)
    if args.command == "generate":
        for labels in generate(args.out, only=args.only, checkpoint_dir=args.checkpoints):
            print(f"{labels['name']}: {json.dumps(labels['incidents'][0] if labels['incidents'] else 'no incident')[:300]}")
        return 0
    markdown, results = score(args.runs)
    print(markdown)
    if args.explain:
        print(_explain(results))
    if not args.no_write:
        write_section("spike_suite", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
