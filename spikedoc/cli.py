"""The `spikedoc` command line: `spikedoc analyze RUN [--json]` and `spikedoc demo`."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from spikedoc.errors import EXIT_BAD_INPUT, SpikedocError, one_line

__all__ = ["app", "EXIT_HEALTHY", "EXIT_INCIDENTS"]

#: Exit codes: healthy (or only minor incidents), an incident needs attention (EXIT_BAD_INPUT = 2 for unusable input).
EXIT_HEALTHY, EXIT_INCIDENTS = 0, 1

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="spikedoc: training-run stability monitor and loss-spike doctor for PyTorch.",
)


@app.callback()
def _main() -> None:
    """spikedoc: training-run stability monitor and loss-spike doctor for PyTorch."""


@app.command()
def analyze(
    run: Annotated[Path, typer.Argument(help="A spikedoc run directory, a CSV log (step,loss[,grad_norm][,lr]) or a TensorBoard log dir.", show_default=False)],
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON (documented in docs/analysis.md).")] = False,
) -> None:
    """Find loss spikes, attribute them to batches and layers, name the cause and say what to do.

    Exit code 0 when the run is healthy or its incidents are all minor, 1 when an incident needs
    attention (moderate or severe), 2 for unusable input.
    """
    diagnosis = _run_or_exit(run)
    if as_json:
        typer.echo(json.dumps(diagnosis.to_dict(), indent=2))
    else:
        from spikedoc.report.terminal import render

        render(diagnosis, Console(highlight=False))
    raise typer.Exit(code=EXIT_INCIDENTS if diagnosis.needs_attention else EXIT_HEALTHY)


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
            from spikedoc.demo import guarded_demo_run

            result = guarded_demo_run(out, fault)
            console.print(f"The guard vetoed {result['vetoes']} step(s) and rolled back {result['rollbacks']} time(s); the run "
                          f"finished its {result['steps']} steps at a loss of {result['final_loss']:.3f} (mean of the last 10).")
        else:
            record_demo_run(out, fault)
    except OSError as exc:
        _fail(f"{out}: {exc.strerror or exc}", EXIT_BAD_INPUT)
    console.print(f"Recorded. What `spikedoc analyze {out}` says:\n")
    from spikedoc.report.terminal import render

    render(_run_or_exit(out), console)
    console.print(f"\n[dim]The run stays in {out}: try `spikedoc analyze {out} --json`, or spikedoc.load() it in Python.[/dim]")


def _demo_faults() -> list[str]:
    from spikedoc.demo import FAULTS  # no torch import: FAULTS is plain data

    return list(FAULTS)


def _guard_faults() -> list[str]:
    from spikedoc.demo import GUARD_FAULTS  # no torch import: plain data

    return list(GUARD_FAULTS)


def _run_or_exit(run: Path):
    # Library warnings are collected in Diagnosis.warnings and printed once by the report; without a
    # handler here Python's last-resort handler would print them a second time, unformatted.
    logging.getLogger("spikedoc").addHandler(logging.NullHandler())
    try:
        from spikedoc.analysis import analyze as _analyze

        return _analyze(run)
    except SpikedocError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:  # unreadable path, permission denied: a user problem, not a bug
        _fail(f"{run}: {exc.strerror or exc}", EXIT_BAD_INPUT)


def _fail(message: str, code: int) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {escape(one_line(message))}")
    raise typer.Exit(code=code)
