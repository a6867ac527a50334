"""One `generate` (or `calibrate`) from a validated RunConfig to files on disk.

Order matters and is fixed: runtime (process group) -> checkpoint inspection (no weights) ->
flag/checkpoint cross-checks -> seed agreement -> model load -> denoise -> outputs on rank 0.
The runtime is always torn down, whatever fails.
"""
from __future__ import annotations

import random
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from launcher.config import RunConfig


def default_save_file(cfg: RunConfig) -> Path:
    """Official naming: task_size_ulysses_prompt50_timestamp.mp4 in the working directory."""
    prompt = cfg.prompt.replace(" ", "_").replace("/", "_")[:50]
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(f"{cfg.task.name}_{cfg.size.replace('*', 'x')}_{cfg.ulysses_size}_{prompt}_{stamp}.mp4")


def draw_seed(base_seed: int) -> int:
    """Official: a negative seed means `random.randint(0, sys.maxsize)`."""
    return base_seed if base_seed >= 0 else random.randint(0, sys.maxsize)


class _Stage:
    """What this rank is doing, for the one-line message when a peer dies under it."""

    def __init__(self, now: str) -> None:
        self.now = now


def run_generate(cfg: RunConfig, *, calibration_out: Path | None = None) -> dict[str, Any] | None:
    """Run one generation; returns the manifest on the output rank (None elsewhere)."""
    from launcher.checkpoints import inspect_checkpoint
    from launcher.errors import peer_lost
    from launcher.runtime import running

    info = inspect_checkpoint(cfg.ckpt_dir, cfg.task)
    if calibration_out is None and cfg.magcache.calibration:
        calibration_out = Path(f"magcache_ratios_{cfg.task.name}.json")
    stage = _Stage("while joining the other ranks")
    try:
        with running(cfg, num_heads=info.num_heads) as rt:
            manifest = _generate_on(rt, cfg, info, calibration_out, stage)
            stage.now = "at the end of the run (outputs already written)"
        return manifest
    except Exception as e:
        # a dead or silent peer surfaces as a gloo/NCCL error in whatever collective this rank was
        # in: say so in one line (exit 1) instead of a C++ traceback; the launcher names the rank
        lost = peer_lost(e, stage.now)
        if lost is None:
            raise
        raise lost from None


def _generate_on(rt: Any, cfg: RunConfig, info: Any, calibration_out: Path | None,
                 stage: _Stage) -> dict[str, Any] | None:
    """Load, generate, write. The session (and its models) dies when this returns, before teardown."""
    from launcher.report import print_summary
    from launcher.session import GenerationSession, Outputs
    from launcher.video import manifest_path_for, write_json

    seed = rt.broadcast_seed(draw_seed(cfg.base_seed))
    video = cfg.save_file
    if video is None and calibration_out is None:
        video = default_save_file(cfg)
    outputs = Outputs(video=video, frames=cfg.save_frames, latents=cfg.save_latents, calibration=calibration_out)
    stage.now = "while loading the model"
    session = GenerationSession(cfg, info, rt)
    stage.now = "while generating"
    manifest = session.generate(cfg, seed, outputs)
    if manifest is not None:
        target = video if video is not None else Path(calibration_out).with_suffix(".run.json")
        write_json(manifest_path_for(target), manifest)
        manifest["manifest"] = str(manifest_path_for(target))
        print_summary(manifest)
    return manifest
