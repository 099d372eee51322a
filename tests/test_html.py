"""Specification of `spikedoc report`: a self-contained page, escaped, readable in a real browser."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

import spikedoc
from spikedoc.cli import app
from spikedoc.report.html import render_html
from spikedoc.report.plots import tensor_lines_png
from tests.common.browser import NO_CHROMIUM, chromium, dump_dom, screenshot
from tests.common.planted import NAMES, adamw_meta, healthy_layers, healthy_steps, write_run
from tests.common.cli import one_error_line

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
runner = CliRunner()
needs_chromium = pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)

# Each would change the page's title if the browser ran it.
SCRIPT = "<script>document.title='pwned'</script>"
IMG = "<img src=x onerror=\"document.title='pwned'\">"


def _report(run: Path, out: Path) -> str:
    result = runner.invoke(app, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text()


@pytest.fixture(scope="module")
def lr_surge_page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "lr_surge.html"
    _report(SAMPLES / "lr_surge", out)
    return out


@pytest.fixture
def hostile_run(tmp_path) -> Path:
    """A run whose tensor names, sample ids, metadata, events and very path carry markup (and TeX)."""
    # and a name that is broken TeX: drawn as text, it must not stop the plots
    names = [NAMES[0], f"h.0.{SCRIPT}.weight", "h.0.$\\frac$.weight", *NAMES[3:]]
    steps = healthy_steps()
    steps["sample_ids"] = [[f"{SCRIPT}{i}", IMG] for i in range(len(steps))]
    steps.loc[400, "distinct_token_ratio"] = 0.02  # a bad batch: its sample ids are shown
    steps.loc[400:, "loss"] *= 1.6
    layers = healthy_layers(steps, names=names)
    hot = (layers["name"] == names[1]) & (layers["step"] >= 398)
    layers.loc[hot, "grad_norm"] *= 50  # the scripted tensor leads the incident
    meta = adamw_meta(model={"class": SCRIPT, "num_parameters": 1})
    events = [("checkpoint", 350, {"path": f"ckpt/{SCRIPT}.pt"}), ("rollback", 420, {"reason": SCRIPT})]
    return write_run(tmp_path / f"run{IMG.replace('/', '')}", steps, layers, meta=meta, events=events)


def test_the_page_has_the_summary_the_overview_and_one_section_per_incident(lr_surge_page):
    page = lr_surge_page.read_text()
    assert "id='summary'" in page and "id='overview'" in page and "id='findings'" in page
    sections = re.findall(r"<section class='incident' id='incident-(\d+)' data-severity='(\w+)' data-onset='(\d+)'", page)
    assert sections == [("1", "severe", "152")]
    assert "lr_schedule" in page and "persistent" in page
    assert "step-000150.pt (the state before step 150)" in page and "because verdict persistent" in page
    assert "Per-tensor gradient norms around onset" in page and "Implicated tensors" in page


def test_the_page_loads_nothing_and_runs_no_script(lr_surge_page):
    page = lr_surge_page.read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=['"](https?:)?//""", page)  # no external image, style or script
    assert len(re.findall(r"src='data:image/png;base64,", page)) >= 4  # overview, zoom, heatmap, tensor lines


def test_every_string_from_the_run_is_escaped(hostile_run, tmp_path):
    page = _report(hostile_run, tmp_path / "hostile.html")
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;400" in page  # a sample id of the onset batch, as text
    assert "h.0.&lt;script&gt;" in page  # the tensor name in the leaders' table
    assert "model &lt;script&gt;" in page  # meta.json's model class in the header
    assert "Per-tensor gradient norms around onset" in page  # the TeX-like name did not stop the heatmap
    assert "What the guard did" in page and "(&lt;script&gt;document.title" in page  # the rollback's reason, in its sentence


def test_a_csv_run_gets_the_plots_it_has_data_for(tmp_path):
    steps = healthy_steps()[["step", "loss"]]
    steps.loc[400, "loss"] *= 3
    steps.to_csv(tmp_path / "log.csv", index=False)
    page = _report(tmp_path / "log.csv", tmp_path / "csv.html")
    assert "id='incident-1'" in page
    assert "Per-tensor gradient norms" not in page and "Batches at onset" not in page
    assert "no per-tensor attribution" in page  # what the import lacks, said


def test_a_million_step_run_keeps_its_spike_and_a_small_page(tmp_path):
    n = 1_000_000
    rng = np.random.default_rng(0)
    loss = 2.0 + 0.02 * rng.standard_normal(n)
    loss[777_777] = 9.0
    frame = pd.DataFrame({"step": np.arange(n), "loss": loss})
    run = spikedoc.store.reader.Run(path=tmp_path, source="csv", steps=frame.assign(segment=0, rank=0))
    diagnosis = spikedoc.analyze(run)
    assert [i.onset_step for i in diagnosis.incidents] == [777_777]
    page = render_html(run, diagnosis)
    assert len(page) < 1_500_000
    assert "min..max, so no spike is averaged away" in page


def test_missing_run_empty_run_and_unwritable_output_are_one_line_exit_2(tmp_path, lr_surge_page):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for args in (["report", str(tmp_path / "nope")], ["report", str(tmp_path / "empty")],
                 ["report", str(SAMPLES / "lr_surge"), "-o", str(tmp_path / "file" / "r.html")]):
        result = runner.invoke(app, args)
        one_error_line(result)


@needs_chromium
def test_chromium_renders_the_report_with_plots_and_incident_sections(lr_surge_page, tmp_path):
    dom = dump_dom(lr_surge_page)
    assert "id=\"incident-1\"" in dom and "lr_schedule" in dom
    shot = Image.open(screenshot(lr_surge_page, tmp_path / "shot.png")).convert("L")
    stat = ImageStat.Stat(shot)
    assert stat.stddev[0] > 30, "the screenshot is blank or nearly so"
    dark = sum(shot.histogram()[:128]) / (shot.width * shot.height)
    assert dark > 0.01, "no plot lines or text drawn"


@needs_chromium
def test_chromium_runs_none_of_the_markup_in_a_hostile_run(hostile_run, tmp_path):
    out = tmp_path / "hostile.html"
    _report(hostile_run, out)
    dom = dump_dom(out)
    title = re.search(r"<title>(.*?)</title>", dom, re.S)[1]
    assert title.startswith("spikedoc report: ")  # a script that ran would have made it "pwned"
    assert "<script" not in dom.lower() and "<img src=\"x\"" not in dom
    assert "id=\"incident-1\"" in dom  # and the page still has its sections


def test_a_run_with_many_incidents_explains_the_most_severe_and_folds_the_table(tmp_path):
    steps = healthy_steps(2_000)[["step", "loss"]]
    for k in range(20):
        steps.loc[300 + 80 * k, "loss"] *= 2.0 + 0.1 * k  # twenty one-step spikes, the later ones larger
    steps.to_csv(tmp_path / "log.csv", index=False)
    page = _report(tmp_path / "log.csv", tmp_path / "many.html")
    onsets = [int(s) for s in re.findall(r"<section class='incident' id='incident-\d+' data-severity='\w+' data-onset='(\d+)'", page)]
    assert len(onsets) == 12 and "<details><summary>all 20 incidents</summary>" in page
    incidents = spikedoc.analyze(tmp_path / "log.csv").incidents
    largest = sorted(incidents, key=lambda i: -i.magnitude_sigma)[:12]  # all alike in severity and verdict
    assert {i.severity for i in incidents} == {"moderate"} and onsets == sorted(i.onset_step for i in largest)


def test_a_tensorboard_log_gets_the_plots_it_has_data_for(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step in range(400):
            writer.add_scalar("train/loss", (9.0 if step == 300 else 3.0) + 0.01 * (step % 7), global_step=step)
            writer.add_scalar("train/lr", 1e-3, global_step=step)
    page = _report(tmp_path / "tb", tmp_path / "tb.html")
    assert "id='incident-1'" in page and "data-onset='300'" in page
    assert "Per-tensor gradient norms" not in page and "grad_norm: no gradient-norm detection" in page


def test_reporting_never_imports_torch(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys, spikedoc\n"
        "from spikedoc.report.html import render_html\n"
        "from spikedoc.report.tensorboard import export_tensorboard\n"
        f"run = spikedoc.load({str(SAMPLES / 'lr_surge')!r}); d = spikedoc.analyze(run)\n"
        f"render_html(run, d); export_tensorboard(run, d, {str(tmp_path / 'tb')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_tensor_lines_without_a_positive_update_ratio_draw_with_no_log_scale_warning():
    rows = pd.DataFrame({"step": [0, 1, 0, 1], "name": ["a", "a", "b", "b"], "update_ratio": [0.0, np.nan, 0.0, 0.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tensor_lines_png(rows, ["a", "b"], [("update_ratio", "update/weight")], onset=1)[:4] == b"\x89PNG"
