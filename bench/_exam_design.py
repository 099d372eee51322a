"""The exam's design (which runs, drawn by a seeded random design) and each run's ground truth.

Each base setup (one seed, one draw of the variant axes) is trained clean, as the twin, and with 2
or 3 faults, the families dealt round-robin so that every family gets the same share; then with a
rescaled resume and one more LR surge and optimizer-state fault, each from a random stream of its own
(see `design`). Even seeds are the calibration half, odd seeds the test half. The labels are measured against the twin: they never
come from what `spikedoc.analyze` says.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from bench._exam_train import FAMILIES, KINDS, Fault, Setup
from bench.spike_suite import _noise_sigma

__all__ = ["CAUSE", "EXTRA", "HALVES", "MUST_FIND_DAMAGE", "MUST_FIND_PEAK", "Run", "design", "half_of", "labels", "twin_diverged"]

#: The cause a practitioner would name for each family (spikedoc's vocabulary,
#: `spikedoc.analysis.incident.CAUSES`). A non-finite value with no build-up is a numerics fault.
CAUSE = {
    "bad_batch": "bad_batch",
    "lr_surge": "lr_schedule",
    "lr_restart": "lr_schedule",
    "optimizer_state": "optimizer_state",
    "state_reset": "state_reset",
    "nonfinite": "numerics_rank",
    "instability": "lr_too_high",
}
HALVES = ("calibration", "test")
#: A fault that left at least this lasting damage (held-out eval loss over the twin's) must be found.
MUST_FIND_DAMAGE = 0.02
#: ... and so must one whose training loss peaked at least this many times the twin's.
MUST_FIND_PEAK = 1.5
#: A fault's effect starts where its loss leaves the twin's by this many of the twin's noise sigmas.
EFFECT_SIGMAS = 3.0

Run = tuple[Setup, "Fault | None"]


def half_of(setup: Setup) -> str:
    """`calibration` (even seed) or `test` (odd seed)."""
    return HALVES[setup.seed % 2]


# ------------------------------------------------------------------------------------ design


def _base(rng: random.Random, seed: int) -> Setup:
    """One draw of the variant axes."""
    batch = rng.choice((8, 16, 16, 32))
    return Setup(
        seed=seed,
        d_model=rng.choice((16, 32, 32, 48)),
        n_layer=rng.choice((1, 2, 2, 3)),
        batch=batch,
        accum=rng.choice((1, 1, 2)) if batch >= 16 else 1,
        optimizer=rng.choice(("adamw", "adamw", "adam", "sgd", "lion")),
        lr_scale=rng.choice((0.5, 1.0, 1.5)),
        warmup=rng.choice((6, 12, 24)),
        clip=rng.choice((None, None, 1.0, 0.5)),
        output=rng.choice(("loss", "logits")),
        checkpoints=rng.choice(("none", "numbered", "overwrite")),
    )


def _position(rng: random.Random, setup: Setup, length: int = 1) -> int:
    """A step early, in the middle or late in the run, leaving 20 steps after the fault to judge it by."""
    band = rng.choice(((0.25, 0.4), (0.45, 0.6), (0.65, 0.8)))
    lo, hi = int(band[0] * setup.steps), int(band[1] * setup.steps)
    return min(rng.randint(max(lo, setup.warmup + 5), max(hi, setup.warmup + 5)), setup.steps - 20 - length)


def _fault(rng: random.Random, family: str, setup: Setup) -> Fault:
    """One fault of `family`, its kind and parameters drawn for `setup`."""
    if family == "bad_batch":
        kind = rng.choice(KINDS["bad_batch"])
        length = rng.randint(5, 10) if kind == "repeated" else rng.choice((1, 1, rng.randint(3, 10)))
        return Fault(family=family, kind=kind, step=_position(rng, setup, length), length=length)
    if family == "lr_surge":
        length = int(round(math.exp(rng.uniform(0, math.log(20)))))
        factor = round(math.exp(rng.uniform(math.log(3), math.log(30))), 1)
        return Fault(family=family, kind="surge", step=_position(rng, setup, length), length=length, factor=factor)
    if family == "optimizer_state":
        # Zeroed second moments (the classic lossy converter) twice as often; SGD and Lion keep no exp_avg_sq.
        kinds = ("zero_v", *KINDS[family]) if setup.optimizer in ("adam", "adamw") else ("scale_m", "drop")
        return Fault(family=family, kind=rng.choice(kinds), step=_position(rng, setup))
    if family == "instability":  # no warmup and an LR several times the optimizer's stable one
        lo, hi = {"sgd": (2.0, 4.0), "lion": (5.0, 20.0)}.get(setup.optimizer, (20.0, 60.0))
        return Fault(family=family, kind="no_warmup", step=0, factor=round(rng.uniform(lo, hi), 1))
    kinds = ("restart",) if family == "lr_restart" else KINDS[family]  # rescaled: a stream of their own (`_rescaled`)
    return Fault(family=family, kind=rng.choice(kinds), step=_position(rng, setup))


def _rescaled(rng: random.Random, setup: Setup) -> Fault:
    """A resume whose schedule goes on at the right step with its LR scaled `factor` times: the linear
    scaling rule applied for the world size (or global batch) of the resumed job, or the scheduler's
    `base_lrs` restored from a run of another size. The factor is a power of two, as a world size
    changes; the LR is too high, at once, from the resume to the end."""
    return Fault(family="lr_restart", kind="rescaled", step=_position(rng, setup), factor=float(rng.choice((2, 4, 8, 16))))


#: Families drawn once more per base, each from a random stream of its own (`_extra`): dealt round-robin
#: alone, too few of their runs had an effect worth finding to score them on.
EXTRA = ("lr_surge", "optimizer_state")


def _extra(design_seed: int, family: str, setup: Setup, held: list[Run]) -> Fault:
    """One more fault of `family` for the base, drawn as the round-robin draws it (`_fault`), from a
    stream seeded by the base and the family alone, so that no other run's draw moves; drawn again
    while it is a run the base already `held` (the same run scored twice would count once more)."""
    rng = random.Random(f"exam-{design_seed}-{setup.seed}-{family}")
    fault = _fault(rng, family, setup)
    while (setup, fault) in held:
        fault = _fault(rng, family, setup)
    return fault


def design(n_bases: int, *, design_seed: int = 0) -> list[Run]:
    """The exam's runs: per base setup its clean twin, then its 2 or 3 faulty runs dealt round-robin,
    then a resume with a rescaled LR (`_rescaled`), then one more fault of each `EXTRA` family
    (`_extra`). Those come from random streams of their own, so that adding them left every other
    run's spec (and cache entry) as it was.

    The rescaled resumes: a resume that restarts the schedule from step 0 re-runs a warmup the tiny
    model mostly tolerates (4-6 visible of 42 per half at 240 bases), too few to score the family on,
    and so does one that goes on from an earlier schedule position (no visible effect in any of 20
    tried: the LR never leaves the schedule's range). The extra draws: dealt round-robin alone, an LR
    surge left a must-find effect in 12-15 of 42-43 runs per half and an optimizer-state fault in 14-17,
    short of the 20 a family is scored on; one more draw per base, from the same distribution (not
    one picked to be visible), brings them to 48-49 and 75-76 of 160-162 at 240 bases.

    Example:
        >>> runs = design(4)
        >>> sum(f is None for _, f in runs), len(runs)
        (4, 26)
    """
    runs: list[Run] = []
    dealt = 0
    for seed in range(n_bases):
        rng = random.Random(f"exam-{design_seed}-{seed}")
        setup = _base(rng, seed)
        base: list[Run] = [(setup, None)]
        for _ in range(2 + (seed // 2) % 2):  # 2, 2, 3, 3, ... faults: both halves alike
            base.append((setup, _fault(rng, FAMILIES[dealt % len(FAMILIES)], setup)))
            dealt += 1
        base.append((setup, _rescaled(random.Random(f"exam-{design_seed}-{seed}-restart"), setup)))
        for family in EXTRA:
            base.append((setup, _extra(design_seed, family, setup, base)))
        runs += base
    return runs


# ------------------------------------------------------------------------------------ labels


def _rollback(latest: int, checkpoints: list[list[Any]]) -> dict[str, Any]:
    """The right rollback: the state before step `latest`, from the newest checkpoint file that still
    holds a state at or before it (a file written again after it holds a later state)."""
    last_write = {path: step for step, path in checkpoints}
    good = [(step, path) for step, path in checkpoints if step <= latest and last_write[path] <= latest]
    step, path = max(good, default=(None, None))
    return {"step": latest, "checkpoint_step": step, "checkpoint": path,
            "overwritten": sorted({p for s, p in checkpoints if s <= latest and last_write[p] > latest})}  # fmt: skip


def twin_diverged(setup: Setup, twin: dict[str, Any]) -> bool:
    """The clean twin diverged by itself: after its warmup its training loss went non-finite or above
    its first step's (the untrained model's) loss. Such a base has no clean reference: its clean run
    is an instability nobody planted, and its faults' effects cannot be told from it."""
    loss = np.asarray(twin["loss"], dtype=float)
    after = loss[max(setup.warmup, 1):]
    return bool(len(loss)) and (not np.isfinite(loss).all() or bool((after > loss[0]).any()))


def labels(setup: Setup, fault: Fault | None, record: dict[str, Any], twin: dict[str, Any]) -> dict[str, Any]:
    """The ground truth of one run, measured against its clean twin.

    Returns:
        `family`, `kind`, `cause`, `planted_step`, `same_until` (first step whose loss differs from
        the twin's, None if none), `onset_range` ([planted, first step >= 3 noise sigmas above the
        twin]), `peak_ratio` (largest loss / twin loss from the planted step on; inf when non-finite),
        `peak_step`, `damage` (held-out eval loss / twin's - 1; inf when non-finite), `nonfinite`,
        `band` (`none`, `small`, `must_find`), `rollback`, `checkpoints`, `twin_diverged` (see
        `twin_diverged`: such a base is left out of the scores). A clean run has family `clean`.

    Example:
        >>> labels(Setup(seed=1), None, {"loss": [1.0], "eval_loss": 1.0, "checkpoints": []}, {})["band"]
        'none'
    """
    out: dict[str, Any] = {"half": half_of(setup), "family": "clean", "kind": None, "cause": None, "band": "none",
                           "checkpoints": record["checkpoints"],
                           "twin_diverged": twin_diverged(setup, twin if fault is not None else record)}  # fmt: skip
    if fault is None:
        return out
    loss, base = np.asarray(record["loss"], dtype=float), np.asarray(twin["loss"], dtype=float)
    differ = np.flatnonzero(~((loss == base) | (np.isnan(loss) & np.isnan(base))))
    sigma = _noise_sigma(twin["loss"], setup.warmup)  # step-to-step noise of the twin after warmup
    excess = np.where(np.isfinite(loss), loss - base, np.inf)
    after = np.arange(fault.step, len(loss))
    off = after[excess[after] > EFFECT_SIGMAS * sigma]
    ratio = np.where(np.isfinite(loss), loss / base, np.inf)[after]
    peak = int(after[np.argmax(ratio)])
    evals = (record["eval_loss"], twin["eval_loss"])
    damage = evals[0] / evals[1] - 1 if math.isfinite(evals[0]) else math.inf
    nonfinite = not np.isfinite(loss).all()
    onset = int(off[0]) if len(off) else None
    must = nonfinite or damage >= MUST_FIND_DAMAGE or float(ratio.max()) >= MUST_FIND_PEAK
    out.update(
        family=fault.family, kind=fault.kind, cause=CAUSE[fault.family], planted_step=fault.step,
        length=fault.length, factor=fault.factor,
        same_until=int(differ[0]) if len(differ) else None,
        onset_range=[fault.step, max(fault.step + fault.length - 1, onset if onset is not None else fault.step)],
        noise_sigma=sigma, peak_step=peak, peak_ratio=float(ratio.max()), damage=float(damage), nonfinite=nonfinite,
        band="must_find" if must else "small" if onset is not None else "none",
        # An instability has no planted step: a rollback to before its first visible effect is sane.
        rollback=_rollback(fault.step if fault.family != "instability" else onset or 0, record["checkpoints"]),
    )  # fmt: skip
    return out
