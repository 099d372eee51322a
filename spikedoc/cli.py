"""The `spikedoc` command line: analyze, report, tensorboard, tail and demo."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from spikedoc import __version__
from spikedoc.errors import EXIT_BAD_INPUT, EXIT_INCOMPLETE, SpikedocError, one_line

__all__ = ["app", "main", "EXIT_HEALTHY", "EXIT_INCIDENTS", "EXIT_INCOMPLETE", "DOCS"]

#: Exit codes: nothing to act on, an incident's advice holds something to do (EXIT_BAD_INPUT = 2 for
#: unusable input; EXIT_INCOMPLETE = 3 for a run with holes where nothing is to be done).
EXIT_HEALTHY, EXIT_INCIDENTS = 0, 1
#: Where the documentation lives online (a pip install has no docs/ folder).
DOCS = "https://github.com/spikedoc/spikedoc/blob/main/docs/"
_README = "https://github.com/spikedoc/spikedoc#readme"
_RUN_HELP = "A spikedoc run directory, a CSV log (step,loss[,grad_norm][,lr]) or a TensorBoard log dir."
_Lenient = Annotated[bool, typer.Option("--lenient", help="Read cells that are not numbers (text in a loss column) as missing, and say so, instead of exit 2.")]

app = typer.Typer(
    add_completion=False,
    help="spikedoc: training-run stability monitor and loss-spike doctor for PyTorch.",
    epilog=f"Documentation: {_README}",
)


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)] = False,
) -> None:
    """spikedoc: training-run stability monitor and loss-spike doctor for PyTorch."""
    if version:
        typer.echo(f"spikedoc {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:  # bare `spikedoc`: the help, and no error
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


@app.command(epilog=f"The JSON shape, the cause rules and the exit codes: {DOCS}analysis.md")
def analyze(
    run: Annotated[Path, typer.Argument(help=_RUN_HELP, show_default=False)],
    *,
    as_json: Annotated[bool, typer.Option("--json", help=f"Print the diagnosis as JSON (shape: {DOCS}analysis.md).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No report: one summary line, and the exit code.")] = False,
    start: Annotated[int | None, typer.Option(help="Analyse steps from this one on (inclusive).", show_default=False)] = None,
    stop: Annotated[int | None, typer.Option(help="Analyse steps before this one (exclusive, like Python's range).", show_default=False)] = None,
    threshold: Annotated[float | None, typer.Option(help="Robust sigmas above the rolling baseline that flag a step (default 7, as OLMo 2's spike score).", show_default=False)] = None,
    window: Annotated[int | None, typer.Option(help="Steps in the detector's rolling baseline (default 100).", show_default=False)] = None,
    lenient: _Lenient = False,
) -> None:
    """Find loss spikes, attribute them to batches and layers, name the cause and say what to do.

    Exit code 0 when nothing is to be done (no incident, or only ones the run recovered from), 1
    when an incident's advice holds something to do (a rollback, data to skip, a fix) that no guard
    already did, 2 for unusable input, 3 when the run is incomplete (steps missing: an unreadable
    part, a gap in a log) and nothing else is to be done.
    """
    console = Console(highlight=False)
    diagnosis = _diagnose(_load(run, start, stop, console, lenient=lenient), threshold, window, console)
    if as_json:
        typer.echo(json.dumps(diagnosis.to_dict(), indent=2))
    elif quiet:
        console.print(_summary_line(diagnosis), soft_wrap=True)
    else:
        from spikedoc.report.terminal import render

        render(diagnosis, console)
    raise typer.Exit(code=_exit_code(diagnosis))


def _exit_code(diagnosis: Any) -> int:
    # An incident that needs attention outranks the holes: acting on it cannot wait for the lost steps.
    if diagnosis.needs_attention:
        return EXIT_INCIDENTS
    return EXIT_HEALTHY if diagnosis.complete else EXIT_INCOMPLETE


@app.command(epilog=f"What the page shows: {DOCS}report.md")
def report(
    run: Annotated[Path, typer.Argument(help=_RUN_HELP, show_default=False)],
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    lenient: _Lenient = False,
) -> None:
    """Write a self-contained HTML report: plots of the run with incidents shaded, and each incident explained.

    The page needs no network and runs no script. Exit code 0 when written (whatever it found), 2 for
    unusable input or an unwritable --out.
    """
    from spikedoc.report.html import render_html

    console = Console(highlight=False)
    loaded = _load(run, None, None, console, lenient=lenient)
    diagnosis = _diagnose(loaded, None, None, console)
    with _stage(console, "drawing the plots"):
        page = render_html(loaded, diagnosis).encode("utf-8")
    _write(out, page)
    console.print(f"Wrote {out} ({len(page) / 1e6:.2f} MB): {_summary_line(diagnosis)}", soft_wrap=True)


@app.command(epilog=f"The run format: {DOCS}run-format.md")
def tensorboard(
    run: Annotated[Path, typer.Argument(help=_RUN_HELP, show_default=False)],
    logdir: Annotated[Path, typer.Argument(help="Folder for the TensorBoard event file (created if needed).", show_default=False)],
    *,
    lenient: _Lenient = False,
) -> None:
    """Write the run as TensorBoard scalars (per-tensor series grouped by module) and its incidents as text.

    Then: tensorboard --logdir LOGDIR. Exit code 0 when written, 2 for unusable input or LOGDIR.
    """
    from spikedoc.report.tensorboard import export_tensorboard

    console = Console(highlight=False)
    loaded = _load(run, None, None, console, lenient=lenient)
    diagnosis = _diagnose(loaded, None, None, console)
    try:
        with _stage(console, "writing event files"):
            counts = export_tensorboard(loaded, diagnosis, logdir)
    except OSError as exc:
        _fail(f"cannot write to {logdir}: {exc.strerror or one_line(exc)}", EXIT_BAD_INPUT)
    console.print(f"Wrote {counts['scalars']:,} scalar points under {counts['tags']} tags and {counts['texts']} text "
                  f"summaries to {logdir}; view them with: tensorboard --logdir {logdir}", soft_wrap=True)


@app.command()
def tail(
    run: Annotated[Path, typer.Argument(help="A spikedoc run directory being written by spikedoc.watch.", show_default=False)],
    *,
    interval: Annotated[float, typer.Option(help="Seconds between looks for new steps.", min=0.05)] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Read what is there, print one line (and any alerts), exit.")] = False,
) -> None:
    """Follow a run as it is written: a line per interval with loss, grad norm and LR, an alert when a step is flagged, and the guard's actions.

    Alerts come from the streaming detector `analyze` uses. While it follows, the writer keeps the
    steps not yet flushed in a live file, so each interval shows that interval's steps. Ctrl-C stops
    (exit code 0); 2 when RUN is missing or not a run, its meta.json or a part is malformed, or
    (with --once) it has no steps yet.
    """
    from spikedoc.report.tail import RunFollower, print_events, print_progress

    console = Console(highlight=False)
    _quiet_library_logs()
    waited = False
    try:
        follower = RunFollower(run, interval=None if once else interval)
    except SpikedocError as exc:
        _fail(str(exc), exc.exit_code)
    try:
        while True:
            update = follower.poll() if follower.started else None
            if update is not None:
                print_events(console, update)
            if update is not None and update.new_steps:
                print_progress(console, update)
            elif once:
                _fail(f"{run} has no step rows yet: the run has not flushed its first steps", EXIT_BAD_INPUT)
            elif not waited and follower.steps_read == 0:
                console.print(f"[dim]waiting for {escape(str(run))} to write its first steps ...[/dim]", soft_wrap=True)
                waited = True
            if once:
                return
            time.sleep(interval)
    except SpikedocError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        console.print(f"[dim]stopped after {follower.steps_read:,} steps[/dim]")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the recorded run (default: a new temporary directory).", show_default=False)] = None,
    fault: Annotated[str | None, typer.Option("--fault", help="Which fault to plant: " + ", ".join(_demo_faults()) + " (default bad_batch_long; with --guard: " + ", ".join(_guard_faults()) + ", default optimizer_state).", show_default=False)] = None,
    guard: Annotated[bool, typer.Option("--guard", help="Train under spikedoc.Guard and show the fault healed: vetoed, or rolled back and replayed.")] = False,
) -> None:
    """Train a tiny GPT on CPU with spikedoc.watch (under spikedoc.Guard with --guard), plant a fault, then analyze the run.

    Exit code 0 when the demo ran (whatever it found), 2 for a bad option or an unwritable --out.
    """
    from spikedoc.demo import FAULTS, GUARD_FAULTS, record_demo_run

    faults = GUARD_FAULTS if guard else FAULTS
    fault = fault or ("optimizer_state" if guard else "bad_batch_long")
    if fault not in faults:
        _fail(f"unknown --fault {fault!r}{' with --guard' if guard else ''}; choose one of: {', '.join(faults)}", EXIT_BAD_INPUT)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="spikedoc-demo-")) / fault
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"{out} already exists and is not an empty directory: choose a new one (the demo writes a fresh run)",
              EXIT_BAD_INPUT)
    console = Console(highlight=False)
    how = "under spikedoc.Guard" if guard else "with spikedoc.watch recording every step"
    console.print(f"Training a tiny GPT (2 layers, 300 steps, CPU) {how}; planted: {faults[fault]}. Recording to {out} ...")
    try:
        if guard:
            from spikedoc.analysis._robust import count
            from spikedoc.demo import guarded_demo_run

            with _stage(console, "training under the guard"):
                result = guarded_demo_run(out, fault)
            console.print(f"The guard vetoed {count(result['vetoes'], 'step')} and rolled back "
                          f"{count(result['rollbacks'], 'time')}; the run finished its {result['steps']} steps at a loss "
                          f"of {result['final_loss']:.3f} (mean of the last 10).")
        else:
            with _bar(console, "training") as advance:
                record_demo_run(out, fault, on_step=advance)
    except OSError as exc:
        _fail(f"{out}: {exc.strerror or exc}", EXIT_BAD_INPUT)
    console.print(f"Recorded. What `spikedoc analyze {out}` says:\n")
    from spikedoc.report.html import render_html
    from spikedoc.report.terminal import render

    loaded = _load(out, None, None, console)
    diagnosis = _diagnose(loaded, None, None, console)
    render(diagnosis, console)
    page_path = out.with_name(out.name + ".html")  # next to the run, not inside its directory
    with _stage(console, "drawing the plots"):
        page = render_html(loaded, diagnosis).encode("utf-8")
    _write(page_path, page)
    console.print(f"\nThe HTML report (plots, each incident explained): {page_path}", soft_wrap=True)
    console.print(f"[dim]The run stays in {out}: try `spikedoc analyze {out} --json`, or spikedoc.load() it "
                  "in Python.[/dim]", soft_wrap=True)


def _demo_faults() -> list[str]:
    from spikedoc.demo import FAULTS  # no torch import: FAULTS is plain data

    return list(FAULTS)


def _guard_faults() -> list[str]:
    from spikedoc.demo import GUARD_FAULTS  # no torch import: plain data

    return list(GUARD_FAULTS)


# ------------------------------------------------------------------------------ shared steps


def _load(run: Path, start: int | None, stop: int | None, console: Console, *, lenient: bool = False) -> Any:
    """The run, cut to steps [start, stop) when asked; unusable input exits 2 with one line."""
    _quiet_library_logs()
    try:
        from spikedoc.store.reader import load

        with _stage(console, f"loading {run}"):
            loaded = load(run, lenient=lenient)
    except SpikedocError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:  # unreadable path, permission denied: a user problem, not a bug
        _fail(f"{run}: {exc.strerror or exc}", EXIT_BAD_INPUT)
    if start is None and stop is None:
        return loaded
    if start is not None and stop is not None and stop <= start:
        _fail(f"--stop ({stop}) must be greater than --start ({start}): the range [start, stop) is empty", EXIT_BAD_INPUT)
    steps = loaded.steps
    keep = (steps["step"] >= (start if start is not None else -math.inf)) & (steps["step"] < (stop if stop is not None else math.inf))
    if not keep.any():
        first, last = (int(steps["step"].min()), int(steps["step"].max())) if len(steps) else ("?", "?")
        _fail(f"{run} has no steps in [{start if start is not None else ''}, {stop if stop is not None else ''}): "
              f"its steps run {first}..{last}", EXIT_BAD_INPUT)
    # Events before the range stay (they happened); analysis decides which lie on the analysed lineage.
    events = loaded.events
    before_stop = events["step"] < (stop if stop is not None else math.inf)
    lo, hi = start if start is not None else -math.inf, stop if stop is not None else math.inf
    holes = [h for h in loaded.holes if (h.last_step is None or h.last_step >= lo) and (h.first_step is None or h.first_step < hi)]
    return dataclasses.replace(loaded, steps=steps[keep].reset_index(drop=True), events=events[before_stop].reset_index(drop=True),
                               holes=holes)


def _diagnose(run: Any, threshold: float | None, window: int | None, console: Console) -> Any:
    from spikedoc.analysis import AnalysisConfig, DetectorConfig, analyze

    try:
        detector = None
        if threshold is not None or window is not None:
            given: dict[str, Any] = {}
            if threshold is not None:
                given["threshold"] = threshold
            if window is not None:
                # A baseline shorter than the default history would never count as warm.
                given.update(window=window, min_history=min(DetectorConfig().min_history, max(window, 1)))
            detector = DetectorConfig(**given)
    except ValueError as exc:
        _fail(str(exc).replace("DetectorConfig.", "--").replace("min_history", "window"), EXIT_BAD_INPUT)
    try:
        with _stage(console, "analysing"):
            return analyze(run, config=AnalysisConfig(detector=detector))
    except SpikedocError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:
        _fail(f"{run.path}: {exc.strerror or exc}", EXIT_BAD_INPUT)


def _summary_line(diagnosis: Any) -> str:
    """The run, its incidents and the verdict, then the ids of the warnings found (a schedule restarted
    at a resume is one, with no incident), so that a healthy line never hides them; a run with a
    warning about what happened in it (not its configuration) is not called healthy."""
    from spikedoc.analysis._robust import count
    from spikedoc.report.terminal import run_findings

    warned = list(dict.fromkeys(f.id for f in diagnosis.findings if f.severity == "warning"))
    eventful = any(f.severity == "warning" for f in run_findings(diagnosis))
    return _incidents_line(diagnosis, eventful) + (f"; {count(len(warned), 'warning')}: {', '.join(warned)}" if warned else "")


def _incidents_line(diagnosis: Any, eventful: bool) -> str:
    from spikedoc.analysis._robust import count

    s = diagnosis.summary
    where = f"{diagnosis.path} ({s.get('steps', 0):,} steps)"
    if diagnosis.holes:
        first = diagnosis.holes[0]
        more = f" and {count(len(diagnosis.holes) - 1, 'more hole')}" if len(diagnosis.holes) > 1 else ""
        where += f": incomplete, {first['steps']} missing from the {first['table']} table{more}"
        if diagnosis.healthy:
            return f"{where}; no incidents in the steps read"
    if diagnosis.healthy:
        return f"{where}: {'no incidents' if eventful else 'healthy, no incidents'}"
    counts = [f"{n} {sev}" for sev in ("severe", "moderate", "minor")
              if (n := sum(i.severity == sev for i in diagnosis.incidents))]
    n = len(diagnosis.incidents)
    verdict = "needs attention" if diagnosis.needs_attention else _settled(diagnosis)
    return f"{where}{';' if diagnosis.holes else ':'} {n} incident{'s' if n != 1 else ''} ({', '.join(counts)}), {verdict}"


def _settled(diagnosis: Any) -> str:
    from spikedoc.report.terminal import settled_text

    return settled_text(diagnosis)


def _write(out: Path, data: bytes) -> None:
    """Write through a temporary file next to `out`; an unwritable place exits 2 with one line."""
    from spikedoc.store import write_whole

    try:
        write_whole(out, data)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or one_line(exc)}", EXIT_BAD_INPUT)


@contextlib.contextmanager
def _stage(console: Console, what: str) -> Iterator[None]:
    """A spinner with the elapsed time while `what` runs, on a terminal only (never in pipes or logs)."""
    if not console.is_terminal:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        bar.add_task(escape(what), total=None)
        yield


@contextlib.contextmanager
def _bar(console: Console, what: str) -> Iterator[Any]:
    """A progress bar fed by `advance(done, total)`, on a terminal only."""
    if not console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _quiet_library_logs() -> None:
    # Library warnings are collected in Diagnosis.warnings and printed once by the report; without a
    # handler here Python's last-resort handler would print them a second time, unformatted.
    logging.getLogger("spikedoc").addHandler(logging.NullHandler())


def _fail(message: str, code: int) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {escape(one_line(message))}")
    raise typer.Exit(code=code)


def main(argv: list[str] | None = None) -> None:
    """The `spikedoc` command: `app`, with a command line click cannot parse (an unknown option, a
    missing argument) said in one `error:` line with exit code 2, like every other bad input."""
    # click's UsageError (an unknown option, a missing argument), whichever click this typer parses with.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(args=argv, prog_name="spikedoc", standalone_mode=False)
    except usage_error as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "spikedoc"
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[red]error:[/red] {escape(one_line(exc.format_message()))} (`{escape(command)} --help` lists what it takes)")
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:  # Ctrl-C at a prompt
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # `python -m spikedoc.cli`, the module `[project.scripts]` names, runs the CLI too
    main()
