"""The doctor on a loop in nanoGPT's shape (hooks/nanogpt_loop.py): no cause on a clean run's blips,
an LR surge named with a rollback to the file that holds the state, a NaN named numerics with the
batch to skip. Seeds, sizes and steps here are not those the rules were set on."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import spikedoc
from spikedoc.analysis.causes import to_act_on
from spikedoc.cli import app
from spikedoc.report.terminal import action_text

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    out, run = tmp_path / "out", tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "hooks" / "nanogpt_loop.py"), "--out-dir", str(out), "--run-dir", str(run),
                           "--record-checkpoints", *args],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return run, out / "ckpt.pt"


def _writes(run: Path, path: Path) -> list[int]:
    """Steps of the checkpoint events that wrote `path`."""
    events = spikedoc.load(run).events
    rows = events.loc[events["kind"] == "checkpoint"]
    return [int(s) for s, d in zip(rows["step"], rows["detail"]) if str(path) in d]


def test_a_clean_run_gets_no_cause_for_its_blips_and_exits_0(tmp_path):
    run, _ = _train(tmp_path, "--seed", "3", "--n-embd", "48")
    diagnosis = spikedoc.analyze(run)
    assert all(i.cause == "unknown" for i in diagnosis.incidents), [(i.onset_step, i.cause) for i in diagnosis.incidents]
    assert all(not i.recommendation["skip_sample_positions"] for i in diagnosis.incidents)
    assert CliRunner().invoke(app, ["analyze", str(run)]).exit_code == 0


@functools.cache
def _surge(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return _train(root, "--seed", "5", "--n-embd", "64", "--n-layer", "3", "--fault", "lr_surge", "--fault-iter", "163",
                  "--fault-iters", "12", "--fault-factor", "30")


def _surge_incident(tmp_path_factory):
    run, ckpt = _surge(tmp_path_factory.getbasetemp() / "surge")
    return next(i for i in spikedoc.analyze(run).incidents if 163 <= i.onset_step <= 175), run, ckpt


def test_an_lr_surge_is_the_schedule_not_the_recipe(tmp_path_factory):
    inc, _, _ = _surge_incident(tmp_path_factory)
    rec = inc.recommendation
    assert inc.cause == "lr_schedule" and "fix_schedule" in [a["action"] for a in rec["actions"]]
    assert rec["lr_factor"] == 1.0 and rec["clip_max_norm"] is None


def test_an_lr_surge_with_lasting_damage_rolls_back_only_to_a_file_that_still_holds_the_state(tmp_path_factory):
    inc, run, ckpt = _surge_incident(tmp_path_factory)
    rec = inc.recommendation
    assert inc.verdict == "recovered_with_damage" and rec["rollback"]
    # nanoGPT saves ckpt.pt again whenever the val loss beats its best: whether the file still holds
    # the state before the surge is in the run's checkpoint events.
    writes = _writes(run, ckpt)
    later = [s for s in writes if s > 163]
    if later:
        assert (rec["checkpoint_path"], rec["rollback_to_step"]) == (None, 163)
        assert rec["checkpoints_overwritten"] == [{"path": str(ckpt), "overwritten_at": later[0]}]
        assert action_text(rec["actions"][0]).startswith(f"{ckpt} was overwritten at step {later[0]}; no recorded "
                                                          "checkpoint holds a state before step 163")
    else:
        assert (rec["checkpoint_path"], rec["rollback_to_step"]) == (str(ckpt), max(writes))


def test_a_nan_in_one_loss_is_numerics_with_the_batch_to_skip_and_no_lr_or_clip_advice(tmp_path):
    run, ckpt = _train(tmp_path, "--seed", "7", "--fault", "nan_loss", "--fault-iter", "211", "--gradient-accumulation-steps", "3")
    diagnosis = spikedoc.analyze(run)
    inc = next(i for i in diagnosis.incidents if i.kind == "nonfinite")
    rec = inc.recommendation
    assert (inc.onset_step, inc.cause) == (211, "numerics_rank")
    assert "the first non-finite value is every tensor's gradient" in inc.evidence[0] and "step 211" in inc.evidence[0]
    assert rec["skip_steps"] == [211] and rec["skip_sample_positions"]
    assert rec["lr_factor"] is None and rec["clip_max_norm"] is None
    assert not {"lower_lr", "tighten_clip", "reset_moments", "check_rank"} & {a["action"] for a in rec["actions"]}
    # The NaN never left: roll back to the file, whose last write (val improved) came before the NaN.
    assert rec["rollback"] and (rec["checkpoint_path"], rec["rollback_to_step"]) == (str(ckpt), max(_writes(run, ckpt)))
    assert to_act_on(rec) and diagnosis.needs_attention


def test_the_loop_records_one_row_per_iteration_with_its_micro_steps(tmp_path):
    run, _ = _train(tmp_path, "--max-iters", "30", "--eval-interval", "10", "--gradient-accumulation-steps", "4")
    steps = spikedoc.load(run).steps
    assert list(steps["step"]) == list(range(30)) and (steps["micro_batches"] == 4).all()
