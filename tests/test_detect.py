"""Spike detector: streaming equals offline, resumable state, incidents on real and planted series."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spikedoc.detector.baseline import IQR_TO_SIGMA, RollingBaseline
from spikedoc.analysis.detect import (
    FLAG_COLUMNS,
    DetectorConfig,
    StreamingDetector,
    find_incidents,
    flag_series,
    spike_score,
)

REAL = Path(__file__).resolve().parent.parent / "sample_runs" / "real"


@pytest.fixture(scope="module")
def llmc() -> pd.DataFrame:
    """llm.c GPT-2 124M: 19,560 steps of loss, lr (warm-up then cosine decay) and grad norm."""
    return pd.read_csv(REAL / "modded-nanogpt_2024-10-13_llmc_main.csv")


@pytest.fixture(scope="module")
def speedrun() -> pd.DataFrame:
    """modded-nanogpt 2024-10-29_Optimizers: 5,100 steps of noisy per-step loss with a WSD kink."""
    return pd.read_csv(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv")


def _streamed(steps, values, *, log_scale=False, config=None) -> pd.DataFrame:
    det = StreamingDetector(config, log_scale=log_scale)
    flags = [det.update(int(s), float(v)) for s, v in zip(steps, values)]
    return pd.DataFrame([[getattr(f, c) for c in FLAG_COLUMNS] for f in flags], columns=list(FLAG_COLUMNS))


@pytest.mark.parametrize(("name", "column", "log_scale"), [("llmc", "loss", False), ("llmc", "grad_norm", True), ("speedrun", "loss", False)])
def test_flag_series_equals_streaming_updates_on_real_series(request, name, column, log_scale):
    run = request.getfixturevalue(name)
    offline = flag_series(run["step"], run[column], log_scale=log_scale)
    online = _streamed(run["step"], run[column], log_scale=log_scale)
    assert offline["flagged"].sum() > 0  # the comparison covers flagged steps, not only quiet ones
    pd.testing.assert_frame_equal(offline, online, check_dtype=False, check_exact=True)


def test_state_dict_round_trip_mid_streak_gives_the_flags_of_an_uninterrupted_run(llmc):
    steps, values = llmc["step"].to_numpy(), llmc["grad_norm"].to_numpy()
    whole = flag_series(steps, values, log_scale=True)
    cut = int(np.flatnonzero(whole["flagged"].to_numpy())[3]) + 1  # right after a flagged step: a streak is open
    first = StreamingDetector(log_scale=True)
    first._run(steps[:cut].tolist(), values[:cut].tolist())
    assert first.streak_start is not None
    resumed = StreamingDetector(log_scale=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [resumed.update(int(s), float(v)) for s, v in zip(steps[cut:], values[cut:])]
    assert [f.flagged for f in rest] == whole["flagged"].iloc[cut:].tolist()
    assert [f.z for f in rest] == whole["z"].iloc[cut:].tolist()


def test_load_state_dict_rejects_state_saved_with_other_settings():
    state = StreamingDetector(DetectorConfig(window=64)).state_dict()
    with pytest.raises(ValueError, match="window"):
        StreamingDetector().load_state_dict(state)


def test_planted_spike_in_real_series_is_found_with_onset_peak_end_and_recovery(speedrun):
    run = speedrun.copy()
    at = run.index[run["step"] == 2500][0]
    run.loc[at : at + 2, "loss"] *= [1.6, 2.0, 1.4]
    incidents = [i for i in find_incidents(run) if 2490 <= i.onset_step <= 2510]
    assert len(incidents) == 1
    spike = incidents[0]
    assert (spike.kind, spike.metric, spike.onset_step, spike.peak_step, spike.end_step) == ("loss_spike", "loss", 2500, 2501, 2502)
    assert spike.recovered and spike.recovery_step == 2503
    assert not spike.low_confidence
    assert spike.peak_value == pytest.approx(run.loc[at + 1, "loss"])
    assert spike.peak_ratio == pytest.approx(spike.peak_value / spike.baseline)
    assert 1.8 < spike.peak_ratio < 2.2 and spike.magnitude_sigma > 7


def test_baseline_follows_the_run_so_a_late_spike_below_early_levels_is_found(speedrun):
    run = speedrun.copy()
    at = run.index[run["step"] == 4500][0]
    run.loc[at, "loss"] *= 1.3
    assert run.loc[at, "loss"] < run["loss"].iloc[:100].median()  # a baseline frozen at the start would miss it
    assert [i.onset_step for i in find_incidents(run) if 4490 <= i.onset_step <= 4510] == [4500]


def test_planted_level_shift_is_a_divergence_and_the_baseline_readapts(speedrun):
    run = speedrun.copy()
    cfg = DetectorConfig()
    shifted = run["step"] >= 2000
    run.loc[shifted, "loss"] += 1.0
    divergences = [i for i in find_incidents(run, cfg) if i.kind == "divergence"]
    assert len(divergences) == 1
    div = divergences[0]
    assert div.onset_step == 2000 and not div.recovered and div.recovery_step is None
    assert div.end_step - div.onset_step >= cfg.persist_steps
    flags = flag_series(run["step"], run["loss"], cfg)
    after = flags[flags["step"] > div.end_step + cfg.window]
    # Re-adapted: the baseline sits at the new level and the shifted loss is no longer out of band.
    assert after["baseline"].iloc[0] == pytest.approx(run.loc[run["step"] == after["step"].iloc[0] - 1, "loss"].iloc[0], rel=0.1)
    assert after["flagged"].mean() < 0.01
    assert flags["readapted"].sum() == 1


def test_nonfinite_values_become_a_nonfinite_incident_and_never_enter_the_baseline(speedrun):
    run = speedrun.copy()
    at = run.index[run["step"] == 1200][0]
    run.loc[at : at + 2, "loss"] = [np.nan, np.inf, np.nan]
    incidents = [i for i in find_incidents(run) if i.kind == "nonfinite"]
    assert len(incidents) == 1
    nf = incidents[0]
    assert (nf.onset_step, nf.end_step, nf.metric) == (1200, 1202, "loss")
    assert nf.magnitude_sigma == math.inf and nf.recovered and nf.recovery_step == 1203
    flags = flag_series(run["step"], run["loss"])
    assert flags.loc[at : at + 2, "nonfinite"].all() and flags.loc[at : at + 2, "flagged"].all()
    assert flags.loc[at + 3, "baseline"] == flags.loc[at, "baseline"]
    assert flags.loc[at + 3, "scale"] == flags.loc[at, "scale"]


def test_spike_values_stay_out_of_the_baseline_so_a_second_spike_right_after_is_found(speedrun):
    run = speedrun.copy()
    at = run.index[run["step"] == 2600][0]
    run.loc[at : at + 9, "loss"] *= 2.0  # a ten-step spike...
    run.loc[at + 14, "loss"] *= 1.35  # ...and a smaller one four in-band steps after it
    flags = flag_series(run["step"], run["loss"])
    assert flags.loc[at + 14, "flagged"]
    assert flags.loc[at + 14, "scale"] == pytest.approx(flags.loc[at, "scale"], rel=0.15)
    starts = [i.onset_step for i in find_incidents(run) if 2590 <= i.onset_step <= 2620]
    assert starts == [2600, 2614]


def test_warmup_and_cosine_decay_raise_no_incident():
    rng = np.random.default_rng(0)
    steps = np.arange(6000)
    lr = np.where(steps < 300, steps / 300, 0.5 * (1 + np.cos(np.pi * (steps - 300) / 5700)))
    loss = (3.0 + 8.0 * np.exp(-steps / 150) + 0.6 * (1 - np.cumsum(lr) / lr.sum())) * (1 + 0.02 * rng.standard_normal(6000))
    grad_norm = (0.3 + 2.0 * np.exp(-steps / 200)) * np.exp(0.1 * rng.standard_normal(6000))
    assert find_incidents(pd.DataFrame({"step": steps, "loss": loss, "grad_norm": grad_norm, "lr": lr})) == []


def test_wsd_kink_raises_no_incident():
    rng = np.random.default_rng(1)
    steps = np.arange(5000)
    decay = np.clip((steps - 3750) / 1250, 0, 1)  # warmup-stable-decay: linear cool-down over the last 25%
    loss = (3.2 + 6.0 * np.exp(-steps / 200) - 0.25 * decay) * (1 + 0.015 * rng.standard_normal(5000))
    assert find_incidents(pd.DataFrame({"step": steps, "loss": loss})) == []


def test_real_wsd_run_has_only_one_step_recovered_spikes_around_its_kink(speedrun):
    incidents = find_incidents(speedrun)
    assert all(i.recovered and i.kind == "loss_spike" for i in incidents)
    near_kink = [i for i in incidents if 3300 <= i.onset_step <= 4300]
    assert all(i.onset_step == i.end_step for i in near_kink)


def test_real_llmc_run_has_no_persistent_incident_and_nothing_during_warmup(llmc):
    incidents = find_incidents(llmc[["step", "loss", "grad_norm"]])
    assert incidents and all(i.recovered for i in incidents)
    warmup_end = int(llmc.loc[llmc["lr"].idxmax(), "step"])
    assert not [i for i in incidents if i.onset_step < warmup_end // 2]


def test_short_real_snippet_spike_is_found_with_low_confidence_and_grad_norm_first():
    bloom = pd.read_csv(REAL / "bigscience_bloom176b_spike_31214-31251.csv")
    incidents = find_incidents(bloom[["step", "loss", "grad_norm"]])
    assert len(incidents) == 1
    spike = incidents[0]
    assert (spike.kind, spike.metric, spike.also_flagged) == ("loss_spike", "grad_norm", ["loss"])
    assert spike.onset_step == 31215 and spike.series["loss"]["onset_step"] == 31219
    assert spike.series["loss"]["peak_step"] == 31219 and spike.recovered and spike.recovery_step == 31250
    assert spike.low_confidence


def test_grad_norm_bursts_shortly_before_a_loss_spike_merge_into_one_incident(llmc):
    run = llmc[["step", "loss", "grad_norm"]].copy()
    at = int(run.index[run["step"] == 12000][0])
    run.loc[at - 8, "grad_norm"] *= 5.0  # two separate grad-norm bursts within merge_lead steps...
    run.loc[at - 3, "grad_norm"] *= 20.0
    run.loc[at, "loss"] *= 1.5  # ...before a loss spike
    incidents = [i for i in find_incidents(run) if 11980 <= i.onset_step <= 12010]
    assert len(incidents) == 1
    inc = incidents[0]
    assert (inc.kind, inc.metric, inc.also_flagged, inc.onset_step, inc.end_step) == ("loss_spike", "grad_norm", ["loss"], 11992, 12000)
    grad = inc.series["grad_norm"]
    assert (grad["onset_step"], grad["peak_step"], grad["end_step"]) == (11992, 11997, 11997)
    assert grad["peak_ratio"] == pytest.approx(run.loc[at - 3, "grad_norm"] / grad["baseline"])
    assert inc.peak_step == 11997 and inc.peak_value == run.loc[at - 3, "grad_norm"]
    assert inc.series["loss"]["onset_step"] == 12000 and inc.recovered


def test_short_real_snippet_without_a_spike_raises_nothing():
    bloom = pd.read_csv(REAL / "bigscience_bloom176b_nospike_42780-42784.csv")
    assert find_incidents(bloom[["step", "loss", "grad_norm"]]) == []


def test_quantized_flat_loss_does_not_flag_a_one_quantum_step_but_flags_a_jump():
    values = [3.1234] * 80 + [3.1235, 3.1233] * 10 + [3.1236, 3.4]
    flags = flag_series(range(len(values)), values)
    assert not flags["flagged"].iloc[:-1].any()
    assert flags["flagged"].iloc[-1]
    assert np.isfinite(flags["z"].iloc[-1])


def test_nonfinite_grad_norm_on_a_scaler_skipped_step_is_not_an_incident(speedrun):
    run = speedrun.assign(grad_norm=0.3, skipped=False)
    run.loc[run["step"] == 1500, ["grad_norm", "skipped"]] = [np.inf, True]
    assert not [i for i in find_incidents(run) if i.metric == "grad_norm" or "grad_norm" in i.also_flagged]
    run.loc[run["step"] == 1500, "skipped"] = False
    assert [i.kind for i in find_incidents(run) if i.metric == "grad_norm"] == ["nonfinite"]


def test_rolling_baseline_matches_numpy_on_the_last_window(llmc):
    values = llmc["loss"].to_numpy()[:3000]
    baseline = RollingBaseline(window=100)
    for i, v in enumerate(values):
        if i >= 1:
            n, center, sigma = baseline.summary()
            past = values[max(0, i - 100) : i]
            q1, med, q3 = np.quantile(past, [0.25, 0.5, 0.75])
            assert n == len(past) and center == pytest.approx(med, abs=1e-12)
            if q3 > q1:
                assert sigma == pytest.approx((q3 - q1) * IQR_TO_SIGMA, abs=1e-12)
        baseline.add(float(v))


def _brute_spike_score(values, window, sigma):
    x = [v for v in values if math.isfinite(v)]
    judged = spikes = 0
    for i in range(2, len(x)):
        prev = x[max(0, i - window) : i]
        mean = sum(prev) / len(prev)
        std = math.sqrt(sum((p - mean) ** 2 for p in prev) / len(prev))
        judged += 1
        spikes += x[i] > mean + sigma * std
    return spikes / judged


def test_spike_score_matches_a_brute_force_loop():
    rng = np.random.default_rng(2)
    values = 3 + 0.05 * rng.standard_normal(3000)
    values[rng.choice(3000, 25, replace=False)] += rng.uniform(0.2, 2.0, 25)
    values[[100, 2000]] = np.nan
    for window, sigma in [(1000, 7.0), (50, 3.0)]:
        expected = _brute_spike_score(values, window, sigma)
        assert expected > 0
        assert spike_score(values, window=window, sigma=sigma) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("window", 1),
        ("threshold", 0.0),
        ("threshold", math.nan),
        ("min_history", 0),
        ("scale_floor", -1e-3),
        ("cold_scale_floor", 1e-4),
        ("min_ratio", -0.1),
        ("merge_gap", -1),
        ("persist_steps", 0),
        ("merge_lead", 2.5),
        ("grad_norm_log_scale", "yes"),
    ],
)
def test_config_validation_error_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        DetectorConfig(**{option: value})


def test_config_rejects_min_history_beyond_window():
    with pytest.raises(ValueError, match="min_history"):
        DetectorConfig(window=40, min_history=50)
