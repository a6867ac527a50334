"""A loaded model set that serves one or many generations (`generate` uses one, `batch` many).

Loading is the expensive part (two 14B experts), so it happens once per session; each request
gets a fresh block runner (MagCache state is per video), its own seed and its own outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from launcher.checkpoints import CheckpointInfo
from launcher.config import RunConfig
from launcher.manifest import build_manifest
from launcher.models import load_models
from launcher.pipeline import Request, Result, WanPipeline
from launcher.planning import make_plan, make_schedule
from launcher.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Outputs:
    """Where one request's files go (None = not wanted)."""

    video: Path | None
    frames: Path | None = None
    latents: Path | None = None
    calibration: Path | None = None


class GenerationSession:
    def __init__(self, cfg: RunConfig, info: CheckpointInfo, rt: Runtime) -> None:
        self.cfg = cfg
        self.info = info
        self.rt = rt
        if rt.is_output_rank:
            from launcher.report import log

            log(f"{cfg.task.name}: loading the {info.layout}-layout checkpoint {info.root} "
                f"on {rt.world_size} rank(s), {rt.placement.device}")
        t0 = time.perf_counter()
        self.models = load_models(cfg, info, rt.placement, sharding=rt.sharding, fsdp_mesh=rt.fsdp_mesh)
        self.load_seconds = time.perf_counter() - t0
        self.pipeline = WanPipeline(self.models, exchange=rt.exchange, decode=rt.decodes)

    # -- one request ------------------------------------------------------------------------
    def request_for(self, cfg: RunConfig, seed: int) -> Request:
        image = None
        if cfg.image is not None:
            with Image.open(cfg.image) as im:
                image = im.convert("RGB")
        return Request(
            prompt=cfg.prompt, negative_prompt=cfg.negative_or_default, seed=seed, width=cfg.width,
            height=cfg.height, max_area=cfg.max_area, frame_num=cfg.frame_num, steps=cfg.sample_steps,
            shift=cfg.sample_shift, solver=cfg.sample_solver, guide_scale=cfg.guide_scale, image=image,
        )

    def block_runner(self, cfg: RunConfig):
        """MagCache controller, calibration recorder, or compute-all: fresh state per video."""
        from magcache.controller import ComputeAll, MagCacheController

        if cfg.magcache.calibration:
            from magcache.calibrate import CalibrationRecorder

            return CalibrationRecorder(reduce_sum=self.rt.reduce_sum), None, []
        if not cfg.magcache.enabled:
            return ComputeAll(), None, []
        schedule, table = make_schedule(
            cfg.task, steps=cfg.sample_steps, shift=cfg.sample_shift, solver=cfg.sample_solver,
            with_image=cfg.uses_image, options=cfg.magcache,
        )
        warnings = list(make_plan(task=cfg.task.name, steps=cfg.sample_steps, shift=cfg.sample_shift,
                                  solver=cfg.sample_solver, with_image=cfg.uses_image, options=cfg.magcache).warnings)
        return MagCacheController(schedule, sync=self.rt.sync), table, warnings

    def generate(self, cfg: RunConfig, seed: int, outputs: Outputs) -> dict[str, Any] | None:
        """Run one request; the output rank writes files and returns the manifest."""
        from launcher.report import progress_bar

        runner, table, cache_warnings = self.block_runner(cfg)
        warnings = cfg.warnings + cache_warnings
        if self.rt.is_output_rank:
            from launcher.report import console

            for w in warnings:
                console.print(f"[yellow]warning:[/] {w}")
        request = self.request_for(cfg, seed)
        if self.rt.is_output_rank:
            from launcher.report import log

            log(f"denoising {cfg.sample_steps} steps ({cfg.sample_solver}), seed {seed}")
        with progress_bar(cfg.sample_steps, enabled=self.rt.is_output_rank) as on_step:
            self.pipeline.on_step = on_step
            result = self.pipeline.generate(request, runner)
        decisions = self.rt.gather_decisions([d.to_json() for d in runner.decisions])
        calibration = self._calibration(cfg, runner, result, outputs) if cfg.magcache.calibration else None
        peak = self.rt.gather_peak_memory()
        if not self.rt.is_output_rank:
            return None
        from launcher.outputs import write_outputs

        files = write_outputs(cfg, result, outputs)
        return build_manifest(
            cfg=cfg, info=self.info, rt=self.rt, seed=seed, result=result, decisions=decisions, table=table,
            files=files, peak_memory=peak, load_seconds=self.load_seconds, calibration=calibration,
            warnings=warnings,
        )

    def _calibration(self, cfg: RunConfig, recorder, result: Result, outputs: Outputs) -> dict[str, Any] | None:
        """Merge the branches' records (CFG halves hold one each) and write the ratio file + plot."""
        from magcache.calibrate import plot_calibration, table_from_records, write_ratio_file

        records = self.rt.gather_records(list(recorder.records))
        if not self.rt.is_output_rank or outputs.calibration is None:
            return None
        ratios, stds, cos_dists = table_from_records(records, cfg.sample_steps)
        path = write_ratio_file(
            outputs.calibration, cfg.ratio_table_key, cfg.sample_steps, cfg.sample_shift, ratios, stds, cos_dists,
            meta={"prompt": cfg.prompt, "checkpoint": str(cfg.ckpt_dir)},
        )
        png = plot_calibration(Path(outputs.calibration).with_suffix(".png"), records,
                               title=f"{cfg.task.name} {cfg.sample_steps} steps")
        return {"ratio_file": str(path), "plot": str(png), "forwards": len(records)}
