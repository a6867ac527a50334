"""`calibrate --prompts FILE [--seeds ...]`: one ratio table averaged over many prompts and seeds.

A table calibrated on one prompt fits that prompt; the curves differ from prompt to prompt and
seed to seed. This runs the uncached calibration once per (prompt, seed) with one model load,
averages the curves forward by forward and keeps their spread, so the table (and its plot with
bands) says how much a threshold chosen from it can be trusted on other prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launcher.config import RunConfig


@dataclass(frozen=True, slots=True)
class CalibrationRun:
    """One uncached run to record: its prompt, first frame and seed (-1: drawn by rank 0)."""

    prompt: str
    image: Path | None
    seed: int


def run_calibration(config: RunConfig, runs: list[CalibrationRun], out: Path) -> dict[str, Any] | None:
    """Record every run, average, write OUT and OUT.png on the output rank; returns what was written there."""
    from launcher.engine.lifecycle import open_engine

    with open_engine(config) as engine:
        return _calibrate_on(engine, config, runs, out)


def _calibrate_on(engine: Any, config: RunConfig, runs: list[CalibrationRun], out: Path) -> dict[str, Any] | None:
    """Record, average, write; the session dies with this frame, before the World's teardown."""
    from launcher.config import draw_seed
    from launcher.engine.session import calibration_settings
    from launcher.outputs.files import Outputs
    from launcher.outputs.report import log, warn_once
    from magcache.calibrate import average_runs, plot_averaged, write_ratio_file

    world, session = engine.world, engine.session()
    per_run, used = [], []
    if world.is_output_rank:  # each warning once, with its count, not once per run
        warn_once([session.warnings_for(replace(config, prompt=r.prompt, image=r.image)) for r in runs], "runs")
    for n, run in enumerate(runs, start=1):
        engine.at("while calibrating")
        seed = world.broadcast_seed(draw_seed(run.seed))
        if world.is_output_rank:
            log(f"calibration run {n}/{len(runs)}: seed {seed}, {run.prompt[:60]!r}")
        # the curves need no video
        session.generate(replace(config, prompt=run.prompt, image=run.image), seed, Outputs(video=None), decode=False,
                         quiet=True)
        per_run.append(session.last_calibration_records)
        used.append({"prompt": run.prompt, "image": None if run.image is None else str(run.image), "seed": seed})
    if not world.is_output_rank:
        return None
    averaged = average_runs(per_run, config.sample_steps)
    meta = {"checkpoint": str(config.ckpt_dir), **calibration_settings(config), "runs": used,
            "spread": [round(s, 6) for s in averaged.spread], "per_branch": averaged.per_branch(),
            "per_expert": averaged.per_expert()}
    path = write_ratio_file(out, config.ratio_table_key, config.sample_steps, config.sample_shift,
                            averaged.ratios, averaged.stds, averaged.cos_dists, meta=meta)
    png = plot_averaged(Path(out).with_suffix(".png"), averaged,
                        title=f"{config.task.name} {config.sample_steps} steps, {len(runs)} run(s)")
    worst = max(averaged.spread) if averaged.spread else 0.0
    log(f"ratio table {path} (mean of {len(runs)} runs; largest spread across runs {worst:.4f}), plot {png}")
    return {"ratio_file": str(path), "plot": str(png), "runs": len(runs), "max_spread": worst}
