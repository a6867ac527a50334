"""One `generate` (or `calibrate`) from a validated RunConfig to files on disk.

Order matters and is fixed: the lifecycle (`engine.lifecycle.open_engine`: checkpoint and LoRA
headers, the World) -> seed agreement -> model load -> denoise -> outputs on rank 0. Flags and
output locations were checked before any of it (`launcher.config`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from launcher.config import RunConfig, default_save_file, draw_seed

if TYPE_CHECKING:
    from launcher.engine.lifecycle import Engine


def run_generate(config: RunConfig, *, calibration_out: Path | None = None) -> dict[str, Any] | None:
    """Run one generation; returns the manifest on the output rank (None elsewhere)."""
    from launcher.engine.lifecycle import open_engine
    from launcher.planner.schedule import resolve_config

    config = resolve_config(config)  # --magcache-target-speedup: the threshold, or exit 2, before anything loads
    if calibration_out is None and config.magcache.calibration:
        calibration_out = Path(f"magcache_ratios_{config.task.name}.json")
    with open_engine(config) as engine:
        manifest = _generate_on(engine, config, calibration_out)
        engine.close_session()  # the models go before the World's teardown
        engine.at("at the end of the run (outputs already written)")
    return manifest


def _generate_on(engine: "Engine", config: RunConfig, calibration_out: Path | None) -> dict[str, Any] | None:
    """Agree on the seed, load, generate, write."""
    from launcher.outputs.report import print_summary
    from launcher.outputs.files import Outputs
    from launcher.outputs.atomic import manifest_path_for, write_json

    seed = engine.world.broadcast_seed(draw_seed(config.base_seed))
    video = config.save_file
    if video is None and calibration_out is None:
        video = default_save_file(config)
    outputs = Outputs(video=video, frames=config.save_frames, latents=config.save_latents, calibration=calibration_out)
    session = engine.session()
    engine.at("while generating")
    manifest = session.generate(config, seed, outputs)
    if manifest is not None:
        target = video if video is not None else Path(calibration_out).with_suffix(".run.json")
        write_json(manifest_path_for(target), manifest)
        manifest["manifest"] = str(manifest_path_for(target))
        print_summary(manifest)
    return manifest
