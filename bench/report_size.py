"""Size and time of `spikedoc report` on a long run: the page must stay small and keep every spike.

    python bench/report_size.py [--steps N] [--tensors N] [--cache DIR] [--regenerate] [--no-write]

The run is `bench/analyze_scale.py`'s synthetic run (written with `RunWriter` as `watch(every=1,
layer_every=1)` writes it, planted spikes with per-tensor precursors), by default 1,000,000 steps
with 16 tensors (the page's size depends on the steps and the incidents; the per-tensor plots show
at most 30 tensors whatever the model). `spikedoc report RUN -o PAGE` runs once in a fresh process:
wall time, peak RSS, the page's size and what it is made of, and whether each planted spike's
onset is shaded on the overview (its incident is in the page). Writes the `report_size` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, write_section
from bench.analyze_scale import _DEFAULT_CACHE, _TOLERANCE, ScaleConfig, _spikedoc_command, cached_run


def time_report(run_dir: Path, page: Path) -> dict[str, float]:
    """`spikedoc report RUN -o PAGE` in a fresh process: wall seconds, CPU seconds, peak RSS (MB)."""
    began = time.perf_counter()
    proc = subprocess.Popen([*_spikedoc_command(), "report", str(run_dir), "-o", str(page)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"spikedoc report exited with {code}: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def stage_times(run_dir: Path) -> dict[str, float]:
    """Seconds of each stage in one process: loading, analysing, drawing and assembling the page."""
    import spikedoc
    from spikedoc.report.html import render_html

    began = time.perf_counter()
    run = spikedoc.load(run_dir)
    loaded = time.perf_counter()
    diagnosis = spikedoc.analyze(run)
    analysed = time.perf_counter()
    render_html(run, diagnosis)
    return {"load": loaded - began, "analyze": analysed - loaded, "render": time.perf_counter() - analysed}


def page_parts(text: str) -> dict[str, int]:
    """Bytes of the page by kind: inlined PNGs (base64) and everything else, and the counts."""
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    image_bytes = sum(len(i) for i in images)
    return {"total": len(text.encode()), "images": len(images), "image_bytes": image_bytes,
            "other_bytes": len(text.encode()) - image_bytes,
            "incidents": len(re.findall(r"<section class='incident'", text))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=_DEFAULT_CACHE, help="where generated runs are kept")
    parser.add_argument("--regenerate", action="store_true", help="generate the run even when it is cached")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    cfg = ScaleConfig(steps=args.steps, tensors=args.tensors)
    run_dir, info = cached_run(cfg, args.cache, regenerate=args.regenerate)
    print(f"run: {run_dir} (generated in {info['generation_s']:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        timing = time_report(run_dir, page)
        text = page.read_text()
    parts = page_parts(text)
    stages = stage_times(run_dir)
    onsets = [s["onset"] for s in info["spikes"]]
    spans = [(int(a), int(b)) for a, b in re.findall(r"data-onset='(\d+)' data-end='(\d+)'", text)]
    found = [o for o in onsets if any(a - _TOLERANCE <= o <= b + _TOLERANCE for a, b in spans)]
    command = "python bench/report_size.py"
    if (cfg.steps, cfg.tensors) != (1_000_000, 16):
        command += f" --steps {cfg.steps} --tensors {cfg.tensors}"
    markdown = "\n".join([
        "## HTML report size (`report_size`)",
        "",
        f"Command: `{command}`. {machine_line()}",
        "",
        f"A synthetic run of {cfg.steps:,} steps x {cfg.tensors} tensors (`bench/analyze_scale.py`'s generator, "
        f"{len(onsets)} planted spikes), reported by `spikedoc report RUN -o PAGE` in a fresh process. The overview "
        f"draws each series as a min/max envelope of 1,500 buckets (~{cfg.steps // 1500:,} steps each here), so a "
        "one-step spike keeps its full height.",
        "",
        "| page | inlined PNGs | of which images | the rest (HTML, text) | incident sections | planted spikes with a section | wall | CPU | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {parts['total'] / 1e6:.2f} MB | {parts['images']} | {parts['image_bytes'] / 1e6:.2f} MB | "
        f"{parts['other_bytes'] / 1e3:.0f} kB | {parts['incidents']} | {len(found)}/{len(onsets)} | "
        f"{timing['wall_s']:.1f} s | {timing['cpu_s']:.1f} s | {timing['peak_rss_mb']:.0f} MB |",
        "",
        "Where the time goes, in one process: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        + " (the page itself: the overview's envelopes, each incident's layer window and its plots).",
    ])
    print(markdown)
    if not args.no_write:
        write_section("report_size", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
