"""Write one benchmark's section of BENCHMARKS.md, leaving the other benchmarks' sections alone."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import os

__all__ = ["write_section", "machine_line"]

_BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
_HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun the command to reproduce it.\n"


def machine_line() -> str:
    """One line describing the machine the numbers were measured on."""
    import importlib.metadata as md

    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = "not installed"
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch_version}."
    )


def write_section(name: str, markdown: str, path: Path = _BENCHMARKS) -> None:
    """Replace (or append) the section delimited by `<!-- bench:name -->` markers."""
    text = path.read_text() if path.exists() else _HEADER
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
