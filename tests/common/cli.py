"""What every CLI test of bad input checks: exit 2 and one `error:` line, never a traceback."""

from __future__ import annotations

from typing import Any


def one_error_line(result: Any) -> str:
    """The single `error: ...` line a `CliRunner` result printed; fails the test on anything else."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # CliRunner keeps typer.Exit as a SystemExit; any other exception escaped the CLI's one-line handling.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    return lines[0]
