"""Each script in hooks/ trains for a few steps as a user would run it, and `spikedoc analyze` reads the run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import spikedoc
from spikedoc.cli import app

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = [
    ("plain_torch.py", None),
    ("hf_trainer.py", "transformers"),
    ("lightning.py", "lightning"),
    ("torchrun_ddp.py", None),
    ("torchrun_fsdp.py", None),
]


@pytest.mark.parametrize(("script", "needs"), SCRIPTS)
def test_hook_script_records_a_run_that_analyze_reads(tmp_path, script, needs):
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed: pip install -e '.[{'hf' if needs == 'transformers' else needs}]'")
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if script.startswith("torchrun") else [sys.executable]  # fmt: skip
    done = subprocess.run([*launcher, str(ROOT / "hooks" / script), "--run-dir", str(run_dir), "--steps", "12"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    steps = spikedoc.load(run_dir).steps
    ranks = 2 if script.startswith("torchrun") else 1
    assert sorted(steps["step"]) == sorted(list(range(12)) * ranks)
    assert steps["loss"].notna().all() and steps["grad_norm"].notna().all()
    assert (steps["clip_max_norm"] == 1.0).all()  # each script clips in its own way; the monitor saw it
    result = CliRunner().invoke(app, ["analyze", str(run_dir)])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
