"""Headless Chromium for tests that look at a page as a person would: the rendered DOM and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["chromium", "dump_dom", "screenshot", "NO_CHROMIUM"]

#: Why browser tests skip where no Chromium is installed (.ci/run installs Debian's package).
NO_CHROMIUM = "no chromium on PATH (apt-get install -y chromium; .ci/run does this where apt is available)"

# The flags a sandboxed machine with no network needs: no GPU, no sandbox (root), no background
# connections (refused here, and slow to fail), a fresh profile each time.
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str]) -> subprocess.CompletedProcess:
    binary = chromium()
    assert binary is not None, NO_CHROMIUM
    with tempfile.TemporaryDirectory(prefix="spikedoc-chromium-") as profile:
        return subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120, check=True)


def dump_dom(page: Path) -> str:
    """The DOM after the page loaded (and ran whatever scripts it has), serialized as HTML."""
    return _run(["--dump-dom", page.resolve().as_uri()]).stdout


def screenshot(page: Path, out: Path, *, width: int = 1000, height: int = 1400) -> Path:
    """A PNG of the page's first `height` pixels at `width`."""
    _run([f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()])
    return out
