"""Scale of `spikedoc analyze`: a synthetic 1M-step, 300-tensor run with planted spikes, timed.

    python bench/analyze_scale.py [--steps N] [--tensors N] [--repeats N] [--cache DIR] [--regenerate] [--no-write]

The run is written with `spikedoc.store.RunWriter` exactly as `spikedoc.watch(every=1,
layer_every=1)` writes it (the monitor's default `flush_every=100`, so one part per table per 100
steps), with the step rows the monitor writes (batch fingerprints, no sample ids) and the 13 layer
columns of AdamW for a 33-block decoder. Curves are seeded noise around a warmup + cosine schedule;
a few spikes are planted, each with per-tensor precursors in the layer table (a gradient-norm rise,
optionally an eps-fraction rise or an `exp_avg_sq` collapse) and one with an anomalous batch.
The generated run is cached under `--cache` (keyed by size, seed and generator version) so that
re-timing does not regenerate it. Then `spikedoc analyze RUN --json` runs `--repeats` times in a
fresh process: wall time and peak RSS (the child's `ru_maxrss`), median over repeats, and whether
each planted spike was found at its planted step. Writes the `analyze_scale` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, write_section
from spikedoc.store import RunWriter
from spikedoc.store.schema import LAYERS, STEPS

__all__ = ["ScaleConfig", "Spike", "planted_spikes", "tensor_names", "generate", "time_analyze", "main"]

#: Bumped whenever the generated run changes, so a cached run of an older generator is not reused.
GENERATOR_VERSION = 2
_DEFAULT_CACHE = Path(tempfile.gettempdir()) / "spikedoc-bench-analyze-scale"
_DONE = "scale.json"  # written last into the run dir: a run without it is incomplete and regenerated
# Steps the writer may have waiting before generation pauses (bounds memory; the writer's own
# max_pending_rows would otherwise drop rows, since generating is faster than compressing).
_BACKLOG_STEPS = 2_000
# A planted spike counts as found when an incident's loss onset is within this many steps of it.
_TOLERANCE = 5


@dataclass(kw_only=True)
class ScaleConfig:
    """Size and shape of the synthetic run."""

    steps: int = 1_000_000
    """Optimizer steps, all logged (`every=1`, `layer_every=1`)."""
    tensors: int = 300
    """Named parameter tensors, i.e. layer rows per step."""
    seed: int = 0
    """Seed of every random draw: the same config always writes the same values."""
    flush_every: int = 100
    """Steps per part file (the monitor's default)."""
    checkpoint_every: int = 0
    """Steps between `checkpoint` events; 0 picks steps // 100."""

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1_000:
            raise ValueError(f"ScaleConfig.steps must be an integer >= 1000 (room for the spikes), got {self.steps!r}")
        if not isinstance(self.tensors, int) or self.tensors < 4:
            raise ValueError(f"ScaleConfig.tensors must be an integer >= 4, got {self.tensors!r}")
        if not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"ScaleConfig.flush_every must be a positive integer, got {self.flush_every!r}")
        if self.checkpoint_every == 0:
            self.checkpoint_every = max(1, self.steps // 100)

    @property
    def key(self) -> str:
        return f"run-{self.steps}x{self.tensors}-seed{self.seed}-flush{self.flush_every}-v{GENERATOR_VERSION}"


@dataclass(kw_only=True)
class Spike:
    """One planted spike: the loss jumps at `onset`; `tensors` misbehave from `onset - lead`."""

    onset: int
    lead: int
    loss_factor: float
    """Loss at onset over the clean loss."""
    recovery: int
    """e-folding time (steps) of the loss's return to normal."""
    tensors: list[str]
    precursor: str
    """What precedes the loss jump in `tensors` (whose update/weight ratio rises 10x over `lead` steps in
    every case): `grad` (their gradient norm rises 30x), `eps_frac` (their gradients shrink 10x while
    the eps-dominated fraction rises by 0.3), `exp_avg_sq` (their second moment collapses 100x under
    ordinary gradients), or `batch` (no precursor; the onset batch is near-constant input)."""


# ------------------------------------------------------------------------------ the model


def tensor_names(n: int) -> list[str]:
    """`n` parameter names of a Llama-style decoder: embedding, blocks of 9 tensors, final norm, head.

    Example:
        >>> tensor_names(12)[:3]
        ['embed_tokens.weight', 'blocks.0.attn_norm.weight', 'blocks.0.attn.q_proj.weight']
        >>> tensor_names(12)[-2:]
        ['norm.weight', 'lm_head.weight']
    """
    block = ["attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
             "attn.o_proj.weight", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "mlp.down_proj.weight"]  # fmt: skip
    inner = [f"blocks.{i // len(block)}.{block[i % len(block)]}" for i in range(n - 3)]
    return ["embed_tokens.weight", *inner, "norm.weight", "lm_head.weight"]


def _shape(name: str, d: int = 2048, vocab: int = 50_304, hidden: int = 5_632) -> list[int]:
    if "norm" in name:
        return [d]
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return [vocab, d]
    if "gate_proj" in name or "up_proj" in name:
        return [hidden, d]
    if "down_proj" in name:
        return [d, hidden]
    return [d, d]


def _module(name: str) -> str:
    if "norm" in name:
        return "RMSNorm"
    return "Embedding" if name.startswith("embed") else "Linear"


def _meta(cfg: ScaleConfig, names: list[str]) -> dict[str, Any]:
    """meta.json as `spikedoc.watch` writes it (spikedoc/monitor/meta.py), for this synthetic model."""
    params = [{"name": n, "shape": _shape(n), "dtype": "float32", "numel": math.prod(_shape(n)),
               "module": _module(n), "group": 0 if "norm" not in n else 1, "requires_grad": True}
              for n in names]  # fmt: skip
    decay = [n for n in names if "norm" not in n]
    hyper = {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "amsgrad": False, "foreach": None, "maximize": False}
    return {
        "spikedoc_version": "synthetic",
        "start_time": 1.7e9,
        "start_step": 0,
        "rank": 0,
        "world_size": 1,
        "model": {"class": "SyntheticDecoder", "num_parameters": sum(p["numel"] for p in params), "devices": ["cpu"]},
        "parameters": params,
        "optimizer": {
            "class": "torch.optim.adamw.AdamW",
            "groups": [{**hyper, "weight_decay": 0.1, "params": decay},
                       {**hyper, "weight_decay": 0.0, "params": [n for n in names if "norm" in n]}],
            "weight_decay_params": decay,
        },  # fmt: skip
        "watch": {"every": 1, "layer_every": 1, "clip": 1.0, "flush_every": cfg.flush_every, "flush_seconds": 30.0,
                  "start_step": None, "pad_token_id": None},  # fmt: skip
        "bench": {"generator": "bench/analyze_scale.py", "config": asdict(cfg)},
    }


def planted_spikes(cfg: ScaleConfig) -> list[Spike]:
    """Four spikes spread over the run after warmup, one of each precursor kind, deterministic."""
    names = tensor_names(cfg.tensors)
    blocks = max(1, (cfg.tensors - 3) // 9)
    rng = np.random.default_rng([cfg.seed, 1])
    kinds = [("grad", 2.0, 30), ("eps_frac", 1.6, 40), ("exp_avg_sq", 3.0, 60), ("batch", 1.4, 20)]
    spikes = []
    for i, (kind, factor, recovery) in enumerate(kinds):
        centre = cfg.steps * (0.2 + 0.18 * i)
        onset = int(centre + rng.integers(-cfg.steps // 50, cfg.steps // 50))
        block = int(rng.integers(0, blocks))
        if kind == "batch":  # a bad batch: the whole model's gradient jumps at onset, nothing before
            tensors, lead = [], 0
        else:
            tensors = [n for n in names if n.startswith(f"blocks.{block}.attn.") and ("q_proj" in n or "k_proj" in n)]
            tensors = tensors or names[1:3]
            lead = 40
        spikes.append(Spike(onset=onset, lead=lead, loss_factor=factor, recovery=recovery, tensors=tensors,
                            precursor=kind))  # fmt: skip
    return spikes


# ------------------------------------------------------------------------------ the curves


class _Curves:
    """Noise-free schedules of the run plus each tensor's fixed scale; chunks are drawn on demand."""

    def __init__(self, cfg: ScaleConfig, names: list[str], spikes: list[Spike]) -> None:
        self.cfg, self.names, self.spikes = cfg, names, spikes
        self.warmup = min(2_000, cfg.steps // 50)
        rng = np.random.default_rng([cfg.seed, 2])
        n = len(names)
        numel = np.array([math.prod(_shape(name)) for name in names], dtype=float)
        # Share of the squared gradient norm per tensor (sums to 1), skewed like real models.
        share = numel * rng.lognormal(0.0, 0.7, n)
        self.grad_share = np.sqrt(share / share.sum())
        self.numel = numel
        self.init_std = np.where(["norm" in name for name in names], 1.0, 0.02)
        self.param0 = self.init_std * np.sqrt(numel)
        self.param_growth = rng.uniform(0.2, 1.5, n)
        self.index = {name: i for i, name in enumerate(names)}

    def lr(self, t: np.ndarray) -> np.ndarray:
        peak, floor, w, total = 3e-4, 3e-5, self.warmup, self.cfg.steps
        decay = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * np.clip((t - w) / max(1, total - w), 0, 1)))
        return np.where(t < w, peak * (t + 1) / w, decay)

    def loss(self, t: np.ndarray) -> np.ndarray:
        tau = self.cfg.steps / 2_000
        return 1.9 + 8.9 * (1 + t / tau) ** -0.6

    def grad(self, t: np.ndarray) -> np.ndarray:
        tau = self.cfg.steps / 2_000
        return 0.25 + 2.0 * (1 + t / tau) ** -0.5

    def chunk(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Step columns (one value per step) and layer columns (steps x tensors) for [start, stop)."""
        t = np.arange(start, stop)
        rng = np.random.default_rng([self.cfg.seed, 3, start])
        k, n = len(t), len(self.names)
        lr = self.lr(t)
        loss = self.loss(t) * np.exp(rng.normal(0.0, 0.015, k))
        # Per-tensor gradient norms: the model's norm split by fixed shares, with per-step noise.
        grad = self.grad(t)[:, None] * self.grad_share[None, :] * np.exp(rng.normal(0.0, 0.08, (k, n)))  # (k, n)
        param = self.param0[None, :] * (1 + self.param_growth[None, :] * (t[:, None] / self.cfg.steps))
        ratio = (lr[:, None] / self.init_std[None, :]) * np.exp(rng.normal(0.0, 0.1, (k, n)))
        eps_frac = np.clip(rng.normal(0.002, 0.0005, (k, n)), 0, 1)
        sq_scale = np.exp(rng.normal(0.0, 0.05, (k, n)))
        seq_median = rng.normal(1_400.0, 60.0, k)
        distinct = rng.normal(0.55, 0.02, k)
        for spike in self.spikes:
            rel = t - spike.onset
            after = rel >= 0
            bump = np.where(after, np.exp(-np.maximum(rel, 0) / spike.recovery), 0.0)
            loss *= 1 + (spike.loss_factor - 1) * bump
            grad *= (1 + 9 * np.where(after, np.exp(-np.maximum(rel, 0) / 5), 0.0))[:, None]
            if spike.lead:
                # 0 -> 1 over the lead, back to 0 once the loss has recovered.
                ramp = np.clip((rel + spike.lead) / spike.lead, 0, 1) * (rel < 3 * spike.recovery)
                cols = [self.index[name] for name in spike.tensors]
                # Every precursor ends in oversized updates of its tensors; what comes first differs.
                ratio[:, cols] *= np.exp(np.log(10.0) * ramp)[:, None]
                if spike.precursor == "grad":  # the tensors' gradients grow
                    grad[:, cols] *= np.exp(np.log(30.0) * ramp)[:, None]
                if spike.precursor == "eps_frac":  # gradients shrink to eps scale (Molybog et al. 2023)
                    grad[:, cols] *= np.exp(np.log(0.1) * ramp)[:, None]
                    eps_frac[:, cols] += 0.3 * ramp[:, None]
                if spike.precursor == "exp_avg_sq":  # the second moment collapses under ordinary gradients
                    sq_scale[:, cols] *= np.exp(np.log(0.01) * ramp)[:, None]
            if spike.precursor == "batch":
                at = rel == 0
                distinct[at] = 0.03
                seq_median[at] = 2_048.0
        grad_norm = np.sqrt(np.square(grad).sum(axis=1))
        clip_coef = np.minimum(1.0, 1.0 / np.maximum(grad_norm, 1e-12))
        update = ratio * param
        steps = {"t": t, "lr": lr, "loss": loss, "grad_norm": grad_norm, "clip_coef": clip_coef,
                 "param_norm": np.sqrt(np.square(param).sum(axis=1)),
                 "update_norm": np.sqrt(np.square(update).sum(axis=1)),
                 "step_time": rng.normal(0.35, 0.01, k), "seq_median": seq_median, "distinct": distinct,
                 "hash": rng.integers(0, 2**63, (k, 2))}  # fmt: skip
        exp_avg_sq = np.square(grad) / self.numel[None, :] * sq_scale
        layers = {
            "grad_norm": grad,
            "grad_max": grad * 6.0 / np.sqrt(self.numel)[None, :] * np.exp(rng.normal(0.0, 0.2, (k, n))),
            "param_norm": param,
            "update_norm": update,
            "update_ratio": ratio,
            "nonfinite": np.zeros((k, n), dtype=np.int64),
            "exp_avg_norm": grad * 0.3,
            "exp_avg_sq_mean": exp_avg_sq,
            "exp_avg_sq_max": exp_avg_sq * 150.0,
            "eps_frac": eps_frac,
        }
        return steps, layers


# ------------------------------------------------------------------------------ generation


def generate(cfg: ScaleConfig, run_dir: Path) -> dict[str, Any]:
    """Write the synthetic run into `run_dir` (replacing it) and return its description.

    Example:
        >>> info = generate(ScaleConfig(steps=2_000, tensors=10), Path(tempfile.mkdtemp()) / "run")  # doctest: +SKIP
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    names = tensor_names(cfg.tensors)
    spikes = planted_spikes(cfg)
    curves = _Curves(cfg, names, spikes)
    began = time.perf_counter()
    writer = RunWriter(run_dir, flush_every=cfg.flush_every, flush_seconds=3_600.0,
                       max_pending_rows=4 * _BACKLOG_STEPS * (cfg.tensors + 1))  # fmt: skip
    writer.open(_meta(cfg, names))
    writer.add_event("start", 0, segment=0)
    shapes = "input_ids:8x2048,labels:8x2048"
    for start in range(0, cfg.steps, cfg.flush_every):
        stop = min(start + cfg.flush_every, cfg.steps)
        s, layer = curves.chunk(start, stop)
        k = stop - start
        cols = {key: s[key].tolist() for key in ("lr", "loss", "grad_norm", "clip_coef", "param_norm", "update_norm",
                                                  "step_time", "seq_median", "distinct")}  # fmt: skip
        hashes = [f"{a:016x}{b:016x}" for a, b in s["hash"].tolist()]
        for j in range(k):
            step = start + j
            med = cols["seq_median"][j]
            writer.add_step({
                "step": step, "time": 1.7e9 + 0.35 * step, "step_time": cols["step_time"][j], "loss": cols["loss"][j],
                "micro_batches": 1, "lr": cols["lr"][j], "grad_norm": cols["grad_norm"][j],
                "clip_coef": cols["clip_coef"][j], "param_norm": cols["param_norm"][j],
                "update_norm": cols["update_norm"][j], "nonfinite_grads": 0, "loss_scale": None, "skipped": False,
                "samples": 8, "tokens": 16_384, "sample_offset": 8 * step, "sample_ids": None, "sample_losses": None,
                "input_shapes": shapes, "batch_hash": hashes[j], "seq_len_min": min(med, 2_048.0) * 0.4,
                "seq_len_median": med, "seq_len_max": 2_048.0, "distinct_token_ratio": cols["distinct"][j],
            })  # fmt: skip
        # One block per flush instead of one per step: the writer sorts a part by (step, name) either way.
        block: dict[str, Any] = {"step": np.repeat(s["t"], len(names)), "name": names * k}
        for key, values in layer.items():
            block[key] = values.reshape(-1).astype(np.int64 if key == "nonfinite" else np.float32)
        writer.add_layers(block)
        for step in range(start, stop):
            if step and step % cfg.checkpoint_every == 0:
                writer.add_event("checkpoint", step, path=f"checkpoints/step-{step:07d}.pt")
        while writer.pending_rows > _BACKLOG_STEPS * (cfg.tensors + 1):
            time.sleep(0.002)
    writer.add_event("close", cfg.steps - 1, dropped_rows=0)
    writer.close()
    if writer.dropped_rows:
        raise RuntimeError(f"the writer dropped {writer.dropped_rows} rows while generating {run_dir}")
    info = {
        "config": asdict(cfg),
        "spikes": [asdict(sp) for sp in spikes],
        "generation_s": time.perf_counter() - began,
        "tables": {table: _table_size(run_dir / table) for table in (STEPS, LAYERS, "events")},
    }
    (run_dir / _DONE).write_text(json.dumps(info, indent=2))
    return info


def _table_size(folder: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    parts = sorted(folder.rglob("part-*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    return {"parts": len(parts), "rows": rows, "bytes": sum(p.stat().st_size for p in parts)}


def cached_run(cfg: ScaleConfig, cache: Path, *, regenerate: bool = False) -> tuple[Path, dict[str, Any]]:
    """The generated run for `cfg` under `cache`, generating it when absent, incomplete or asked to."""
    run_dir = cache / cfg.key
    done = run_dir / _DONE
    if not regenerate and done.is_file():
        return run_dir, json.loads(done.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    return run_dir, generate(cfg, run_dir)


# ------------------------------------------------------------------------------ timing


def _spikedoc_command() -> list[str]:
    script = Path(sys.executable).with_name("spikedoc")
    if script.exists():
        return [str(script)]
    found = shutil.which("spikedoc")
    if found:
        return [found]
    return [sys.executable, "-c", "from spikedoc.cli import main; main()"]


def time_analyze(run_dir: Path, repeats: int) -> list[dict[str, Any]]:
    """Run `spikedoc analyze RUN --json` `repeats` times, each in a fresh process.

    Returns:
        Per repeat: `wall_s`, `cpu_s` (user + system), `peak_rss_mb` (the child's ru_maxrss), `exit_code`
        and the parsed JSON as `diagnosis`.
    """
    out = []
    for _ in range(repeats):
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            began = time.perf_counter()
            proc = subprocess.Popen([*_spikedoc_command(), "analyze", str(run_dir), "--json"], stdout=stdout,
                                    stderr=stderr)  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - began
            proc.returncode = os.waitstatus_to_exitcode(status)
            stdout.seek(0)
            stderr.seek(0)
            text, err = stdout.read().decode(), stderr.read().decode()
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"spikedoc analyze exited with {proc.returncode}: {err.strip()[-2000:]}")
        out.append({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
                    "exit_code": proc.returncode, "diagnosis": json.loads(text)})  # fmt: skip
    return out


def stage_times(run_dir: Path) -> dict[str, float]:
    """Seconds of each stage of one in-process analysis: where the time goes."""
    import spikedoc
    from spikedoc.analysis.detect import find_incidents

    began = time.perf_counter()
    run = spikedoc.load(run_dir)
    loaded = time.perf_counter()
    run.layers(0, 0)  # the first call reads every layer part's footer; the Run keeps the step ranges
    indexed = time.perf_counter()
    find_incidents(run.steps)
    detected = time.perf_counter()
    spikedoc.analyze(run)  # detects again, then everything else, on the loaded run and its index
    done = time.perf_counter()
    detection = detected - indexed
    return {
        "load (step and event tables)": loaded - began,
        "layer footers (first layers() call)": indexed - loaded,
        "detection (loss and grad norm)": detection,
        "everything else (lineage, layer windows, attribution, lints)": done - detected - detection,
    }


def match_spikes(spikes: list[dict[str, Any]], diagnosis: dict[str, Any]) -> list[dict[str, Any]]:
    """For each planted spike, the incident whose loss onset is within `_TOLERANCE` steps of it (or None)."""
    incidents = diagnosis.get("incidents", [])
    rows = []
    for spike in spikes:
        best = None
        for inc in incidents:
            loss = (inc.get("series") or {}).get("loss") or {}
            onset = loss.get("onset_step", inc["onset_step"])
            if abs(onset - spike["onset"]) <= _TOLERANCE and (best is None or inc["onset_step"] < best["onset_step"]):
                best = {**inc, "_loss_onset": onset}
        rows.append({"planted": spike, "incident": best})
    return rows


# ------------------------------------------------------------------------------ report

# What `spikedoc analyze` runs (the monitor is not imported by it).
_ANALYZE_CODE = ("spikedoc/analysis", "spikedoc/store", "spikedoc/report", "spikedoc/cli.py", "spikedoc/errors.py",
                 "spikedoc/__init__.py")  # fmt: skip


def _revision() -> str:
    """The commit measured, and whether the code analyze runs had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", *_ANALYZE_CODE], capture_output=True, text=True,
                               check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision (not a git checkout)"
    return f"commit {head.stdout.strip()}" + (" with uncommitted changes to analyze's code" if dirty.stdout else "")


def _report(cfg: ScaleConfig, info: dict[str, Any], runs: list[dict[str, Any]], stages: dict[str, float],
            command: str) -> str:  # fmt: skip
    wall = statistics.median(r["wall_s"] for r in runs)
    rss = statistics.median(r["peak_rss_mb"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    matches = match_spikes(info["spikes"], runs[0]["diagnosis"])
    found = sum(m["incident"] is not None for m in matches)
    incidents = len(runs[0]["diagnosis"]["incidents"])
    tables = info["tables"]
    each = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
    lines = [
        "## `spikedoc analyze` at scale",
        "",
        f"A synthetic run of {cfg.steps:,} steps x {cfg.tensors} tensors written with `RunWriter` as "
        f"`spikedoc.watch(every=1, layer_every=1)` writes it (one part per table per {cfg.flush_every} steps), "
        f"{len(matches)} planted spikes with per-tensor precursors; `spikedoc analyze RUN --json` in a fresh "
        f"process, {len(runs)} repeats (medians below). Targets: under 60 s and under 2 GB peak RSS.",
        "",
        "| table | rows | parts | on disk |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {t['rows']:,} | {t['parts']:,} | {t['bytes'] / 1e9:.2f} GB |" for name, t in tables.items()),
        "",
        "| generation | analyze wall (median) | analyze CPU user+sys | analyze peak RSS | planted found | incidents |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {info['generation_s']:.0f} s | {wall:.1f} s (runs: {each}) | {cpu:.1f} s | "
        f"{rss:,.0f} MB | {found} / {len(matches)} | {incidents} |",
        "",
        "| planted onset | precursor | found onset (loss) | incident onset | cause | tensors named |",
        "| ---: | --- | ---: | ---: | --- | --- |",
    ]
    for m in matches:
        sp, inc = m["planted"], m["incident"]
        if inc is None:
            lines.append(f"| {sp['onset']:,} | {sp['precursor']} | not found | | | |")
            continue
        named = [layer["name"] for layer in inc.get("layers", [])]
        planted = set(sp["tensors"])
        hit = f"{len(planted & set(named))}/{len(planted)} planted" if planted else "none planted"
        lines.append(f"| {sp['onset']:,} | {sp['precursor']} | {inc['_loss_onset']:,} | {inc['onset_step']:,} | "
                     f"{inc.get('cause')} | {len(named)} ({hit}) |")  # fmt: skip
    lines += ["", "Where the time goes (one more analysis, in-process, stage by stage):", "",
              "| stage | wall |", "| --- | ---: |", *(f"| {k} | {v:.1f} s |" for k, v in stages.items())]  # fmt: skip
    matched = {m["incident"]["onset_step"] for m in matches if m["incident"] is not None}
    others = [i for i in runs[0]["diagnosis"]["incidents"] if i["onset_step"] not in matched]
    if others:
        listed = ", ".join(f"{i['kind']} at {i['onset_step']:,} ({i.get('cause')})" for i in others)
        lines += ["", f"Incidents not matching a planted spike: {listed}."]
    lines += ["", f"Command: `{command}`", "", f"{machine_line()} spikedoc at {_revision()}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=_DEFAULT_CACHE, help="where generated runs are kept")
    parser.add_argument("--regenerate", action="store_true", help="generate the run even when it is cached")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    cfg = ScaleConfig(steps=args.steps, tensors=args.tensors, seed=args.seed)
    run_dir, info = cached_run(cfg, args.cache, regenerate=args.regenerate)
    print(f"run: {run_dir} (generated in {info['generation_s']:.0f} s)", flush=True)
    runs = time_analyze(run_dir, args.repeats)
    stages = stage_times(run_dir)
    command = "python bench/analyze_scale.py"
    if (cfg.steps, cfg.tensors, args.repeats) != (1_000_000, 300, 3):
        command += f" --steps {cfg.steps} --tensors {cfg.tensors} --repeats {args.repeats}"
    markdown = _report(cfg, info, runs, stages, command)
    print(markdown)
    if not args.no_write:
        write_section("analyze_scale", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
