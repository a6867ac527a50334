"""One `generate` (or `calibrate`) from a validated RunConfig to files on disk.

Order matters and is fixed: checkpoint inspection (no weights) -> the World (layout checks, process
group) -> seed agreement -> model load -> denoise -> outputs on rank 0. Flags and output locations
were checked before any of it (`launcher.config`). The World is always torn down, whatever fails.
"""
from __future__ import annotations

import random
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from launcher.config import RunConfig

if TYPE_CHECKING:
    from launcher.engine.world import World


def default_save_file(config: RunConfig) -> Path:
    """Official naming: task_size_ulysses_prompt50_timestamp.mp4 in the working directory."""
    prompt = config.prompt.replace(" ", "_").replace("/", "_")[:50]
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(f"{config.task.name}_{config.size.replace('*', 'x')}_{config.ulysses_size}_{prompt}_{stamp}.mp4")


def draw_seed(base_seed: int) -> int:
    """Official: a negative seed means `random.randint(0, sys.maxsize)`."""
    return base_seed if base_seed >= 0 else random.randint(0, sys.maxsize)


class _Stage:
    """What this rank is doing, for the one-line message when a peer dies under it."""

    def __init__(self, now: str) -> None:
        self.now = now


def run_generate(config: RunConfig, *, calibration_out: Path | None = None) -> dict[str, Any] | None:
    """Run one generation; returns the manifest on the output rank (None elsewhere)."""
    from launcher.checkpoint import inspect_checkpoint
    from launcher.errors import peer_lost
    from launcher.engine.planning import resolve_config
    from launcher.engine.world import open_world

    config = resolve_config(config)  # --magcache-target-speedup: the threshold, or exit 2, before anything loads
    info = inspect_checkpoint(config.ckpt_dir, config.task)
    if calibration_out is None and config.magcache.calibration:
        calibration_out = Path(f"magcache_ratios_{config.task.name}.json")
    stage = _Stage("while joining the other ranks")
    try:
        with open_world(config, num_heads=info.num_heads) as world:
            manifest = _generate_on(world, config, info, calibration_out, stage)
            stage.now = "at the end of the run (outputs already written)"
        return manifest
    except Exception as e:
        # a dead or silent peer surfaces as a gloo/NCCL error in whatever collective this rank was
        # in: say so in one line (exit 1) instead of a C++ traceback; the launcher names the rank
        lost = peer_lost(e, stage.now)
        if lost is None:
            raise
        raise lost from None


def _generate_on(world: "World", config: RunConfig, info: Any, calibration_out: Path | None,
                 stage: _Stage) -> dict[str, Any] | None:
    """Load, generate, write. The session (and its models) dies when this returns, before teardown."""
    from launcher.outputs.report import print_summary
    from launcher.engine.session import GenerationSession
    from launcher.outputs.files import Outputs
    from launcher.outputs.atomic import manifest_path_for, write_json

    seed = world.broadcast_seed(draw_seed(config.base_seed))
    video = config.save_file
    if video is None and calibration_out is None:
        video = default_save_file(config)
    outputs = Outputs(video=video, frames=config.save_frames, latents=config.save_latents, calibration=calibration_out)
    stage.now = "while loading the model"
    session = GenerationSession(config, info, world)
    stage.now = "while generating"
    manifest = session.generate(config, seed, outputs)
    if manifest is not None:
        target = video if video is not None else Path(calibration_out).with_suffix(".run.json")
        write_json(manifest_path_for(target), manifest)
        manifest["manifest"] = str(manifest_path_for(target))
        print_summary(manifest)
    return manifest
