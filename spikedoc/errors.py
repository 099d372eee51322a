"""Errors spikedoc raises for bad input; the CLI turns each into one line and an exit code."""

__all__ = [
    "SpikedocError",
    "RunNotFoundError",
    "RunFormatError",
    "RunTooLargeError",
    "UnsupportedVersionError",
    "GuardStopped",
    "one_line",
]

#: Exit code of the CLI for unusable input (see README, "Exit codes").
EXIT_BAD_INPUT = 2
#: Exit code of `spikedoc analyze` for a run with holes (steps it should hold and does not) in which
#: no incident needs attention (see README, "Exit codes").
EXIT_INCOMPLETE = 3


class SpikedocError(Exception):
    """Base class: a user-facing problem with a message that says what was wrong and how to fix it."""

    exit_code: int = EXIT_BAD_INPUT


class RunNotFoundError(SpikedocError):
    """The path given does not exist or holds nothing spikedoc can read."""


class RunFormatError(SpikedocError):
    """The run exists but is malformed: corrupt Parquet, bad meta.json, missing columns."""


class RunTooLargeError(SpikedocError):
    """A table, part or file would not fit in the memory available; refused before it is loaded."""


class UnsupportedVersionError(SpikedocError):
    """The run was written by a newer spikedoc whose format this version cannot read."""


class GuardStopped(SpikedocError):
    """`spikedoc.Guard` stopped the run: its rollback budget is spent or the fault is not one it can heal.

    Attributes:
        diagnosis: What the guard saw, as plain data: `reason`, `step`, `rollbacks`, the
            incident's evidence and the actions taken so far (the same dict as the `guard_stop`
            event in the run directory).
    """

    def __init__(self, message: str, diagnosis: dict | None = None) -> None:
        super().__init__(message)
        self.diagnosis = dict(diagnosis or {})


def one_line(reason: BaseException | str) -> str:
    """An exception or a message as one line: each run of white space (newlines too) becomes a space.

    Example:
        >>> one_line(ValueError("bad value:   expected a number"))
        'bad value: expected a number'
    """
    return " ".join(str(reason).split()) or type(reason).__name__
