"""Numbers as the reports print them, the same in the terminal and in the HTML report."""

from __future__ import annotations

import math
from typing import Any

from spikedoc.analysis._robust import fmt
from spikedoc.analysis.incident import Incident

__all__ = ["peak_text", "ratio_text", "severity_order", "sigma_text", "table_number"]


def table_number(value: Any) -> str:
    """A number for a table: integers from 100 up, 2 significant digits below; anything else as text."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    return f"{value:.0f}" if abs(value) >= 99.5 else fmt(value, 2)  # 99.6 at 2 digits would print as 1e+02


def ratio_text(value: Any) -> str:
    """A ratio as "2.5x", or "non-finite" (never "nanx")."""
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    return f"{table_number(value)}x" if finite else "non-finite"


def sigma_text(value: float) -> str:
    return f"{table_number(value)} sigma" if math.isfinite(value) else "non-finite"


def peak_text(ratio: Any, sigma: float) -> str:
    """A peak against its baseline as "2.6x, 41 sigma"; a non-finite peak says so once, not per number."""
    ratio_says, sigma_says = ratio_text(ratio), sigma_text(sigma)
    return ratio_says if ratio_says == sigma_says else f"{ratio_says}, {sigma_says}"


def severity_order(inc: Incident) -> tuple:
    """Sort key: severe first, then unrecovered, then non-finite, then by size."""
    size = inc.magnitude_sigma if math.isfinite(inc.magnitude_sigma) else 1e300
    return (-("minor", "moderate", "severe").index(inc.severity), inc.recovered, inc.kind != "nonfinite", -size)
