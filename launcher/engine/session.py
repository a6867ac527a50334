"""A loaded model set that serves one or many generations (`generate` uses one, `batch` many).

Loading is the expensive part (two 14B experts), so it happens once per session; each request
gets a fresh block runner (MagCache state is per video), its own seed and its own outputs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from launcher.checkpoint import CheckpointInfo
from launcher.checkpoint.lora import LoraPlan, plan_loras
from launcher.config import RunConfig
from launcher.engine.models import load_models
from launcher.planner.schedule import Sampling, magcache_setup
from launcher.engine.world import World
from launcher.outputs.atomic import sha256_of
from launcher.outputs.files import Outputs
from launcher.outputs.manifest import build_manifest
from launcher.wan.pipeline import Request, Result, WanPipeline


def calibration_settings(config: RunConfig) -> dict[str, Any]:
    """What a ratio table depends on beyond task, steps and shift; `generate` warns when a run differs."""
    return {"sample_solver": config.sample_solver, "loras": [s.label for s in config.loras]}


def _both(a: Callable[[int, int], None] | None, b: Callable[[int, int], None] | None) -> Callable[[int, int], None] | None:
    if a is None or b is None:
        return a or b

    def call(done: int, total: int) -> None:
        a(done, total)
        b(done, total)

    return call


class GenerationSession:
    def __init__(self, config: RunConfig, info: CheckpointInfo, world: World, loras: LoraPlan | None = None) -> None:
        """`loras`: the LoRAs resolved from their headers before the World started (`engine.lifecycle`);
        None resolves them here (harnesses that build a session on a World of their own)."""
        self.config = config
        self.info = info
        self.world = world
        self.loras = loras if loras is not None else plan_loras(
            config.loras, {e: info.transformer_weights[e].shapes for e in config.task.experts}, config.task.name)
        self.lora_json = ([r.to_json(sha256_of(r.file)) for r in self.loras.reports]
                          if world.is_output_rank else [])
        if world.is_output_rank:
            from launcher.outputs.report import log

            log(f"{config.task.name}: loading the {info.layout}-layout checkpoint {info.root} "
                f"on {world.world_size} rank(s), {world.placement.device}")
            formats = sorted({p.format for p in info.prequantized.values()})
            if formats and not config.quantization.enabled:
                log(f"the DiT weights are stored in 8 bits ({', '.join(formats)}); --quantize none runs them "
                    "dequantized in the compute dtype; pass --quantize fp8 to keep them 8-bit on the GPU")
        t0 = time.perf_counter()
        self.models, self.parallel = load_models(config, info, world.placement, world.mesh, self.loras)
        self.load_seconds = time.perf_counter() - t0
        if world.is_output_rank:
            for r in self.loras.reports:
                where = ", ".join(f"{n} weights of {e}" for e, n in r.touched.items())
                log(f"merged LoRA {r.file} at scale {r.scale:g}: {where}")
        self.pipeline = WanPipeline(self.models, exchange=self.parallel.exchange, decode=world.is_output_rank,
                                    split_decode=self.parallel.split_decode)
        self.last_calibration_records: list[Any] = []

    # -- one request ------------------------------------------------------------------------
    def request_for(self, config: RunConfig, seed: int) -> Request:
        image = None
        if config.image is not None:
            with Image.open(config.image) as im:
                image = im.convert("RGB")
        return Request(
            prompt=config.prompt, negative_prompt=config.negative_or_default, seed=seed, width=config.width,
            height=config.height, max_area=config.max_area, frame_num=config.frame_num, steps=config.sample_steps,
            shift=config.sample_shift, solver=config.sample_solver, guide_scale=config.guide_scale, image=image,
            timesteps=config.timesteps,
            # a calibration records both branches whatever the guidance (a ratio table has both)
            cond_only=() if config.magcache.calibration else config.cond_only_experts,
        )

    def block_runner(self, config: RunConfig):
        """MagCache controller, calibration recorder, or compute-all: fresh state per video."""
        from magcache.controller import ComputeAll, MagCacheController

        if config.magcache.calibration:
            from magcache.calibrate import CalibrationRecorder

            return CalibrationRecorder(reduce_sum=self.world.branch_sum()), None
        if not config.magcache.enabled:
            return ComputeAll(), None
        setup = magcache_setup(Sampling.of(config))  # the one `resolve_config` made: table read once
        if setup.options.thresh != config.magcache.thresh:
            raise ValueError(f"the config's threshold {config.magcache.thresh} is not its set-up's "
                             f"{setup.options.thresh}: resolve the config first (resolve_config)")
        return MagCacheController(setup.schedule(), sync=self.world.magcache_sync()), setup.table

    @staticmethod
    def warnings_for(config: RunConfig) -> list[str]:
        """What a run of `config` warns about: its flags, then (with MagCache) its plan."""
        if config.magcache.calibration or not config.magcache.enabled:
            return list(config.warnings)
        return config.warnings + list(magcache_setup(Sampling.of(config)).plan.warnings)

    def generate(self, config: RunConfig, seed: int, outputs: Outputs,
                 on_step: Callable[[int, int], None] | None = None, *, decode: bool = True,
                 quiet: bool = False) -> dict[str, Any] | None:
        """Run one request; the output rank writes files and returns the manifest.

        `on_step(done, total)`: called after each denoise step on every rank (the server's progress).
        `decode=False`: stop at the final latents (calibration curves, a warm-up), no rank decodes.
        `quiet`: the warnings go to the manifest only (a batch says each once, with its count).
        """
        from launcher.outputs.report import progress_bar

        if self.world.placement.device.type == "cuda":  # each request's peak is its own (host RSS peaks are per process)
            torch.cuda.reset_peak_memory_stats(self.world.placement.device)
        runner, table = self.block_runner(config)
        warnings = self.warnings_for(config)
        if self.world.is_output_rank and not quiet:
            from launcher.outputs.report import warn

            for w in warnings:
                warn(w)
        request = self.request_for(config, seed)
        if self.world.is_output_rank:
            from launcher.outputs.report import log

            mc = config.magcache
            if mc.enabled and mc.target_speedup is not None:
                log(f"MagCache threshold {mc.thresh!r}, chosen for --magcache-target-speedup {mc.target_speedup}")
            log(f"denoising {config.sample_steps} steps ({config.sample_solver}), seed {seed}")
            split = self.pipeline.split_decode
            where = "" if split is None else f" on {split.size} ranks (--vae-parallel auto)"
            self.pipeline.on_decode = lambda: log(f"decoding{where}")
        # rank 0 only: with dp replicas (batch, serve) each output rank's lines would interleave unlabelled
        with progress_bar(config.sample_steps, enabled=self.world.is_main, forwards=lambda: runner.decisions) as bar:
            self.pipeline.on_step = _both(bar, on_step)
            result = self.pipeline.generate(request, runner, decode=decode)
        decisions = self.world.gather_branches([d.to_json() for d in runner.decisions], lambda d: d["index"])
        calibration = self._calibration(config, runner, result, outputs) if config.magcache.calibration else None
        vae_decode = self._vae_decode(result)
        peak = self.world.gather_peak_memory(
            at_least_cuda_mb=(result.decode or {}).get("rank", {}).get("cuda_peak_before_mb"))
        if not self.world.is_output_rank:
            return None
        from launcher.outputs.files import write_outputs

        files = write_outputs(config, result, outputs)
        return build_manifest(
            config=config, info=self.info, world=self.world.describe(), seed=seed, result=result, decisions=decisions, table=table,
            files=files, peak_memory=peak, load_seconds=self.load_seconds, calibration=calibration,
            warnings=warnings, vae_decode=vae_decode, loras=self.lora_json,
        )

    def _vae_decode(self, result: Result) -> dict[str, Any]:
        """The manifest's decode record: who decoded, and with a split each rank's band, seconds and peak."""
        if result.decode is None:
            return {"parallel": False, "ranks": 1}
        per_rank = self.world.gather_in_replica({"rank": self.world.rank, **result.decode["rank"]})
        return {"parallel": True, **result.decode["split"], "per_rank": per_rank}

    def _calibration(self, config: RunConfig, recorder, result: Result, outputs: Outputs) -> dict[str, Any] | None:
        """Merge the branches' records (CFG halves hold one each) and write the ratio file + plot."""
        from magcache.calibrate import plot_calibration, table_from_records, write_ratio_file

        records = self.world.gather_branches(list(recorder.records), lambda r: r.index)
        self.last_calibration_records = records  # a multi-prompt calibration averages these
        if not self.world.is_output_rank or outputs.calibration is None:
            return None
        ratios, stds, cos_dists = table_from_records(records, config.sample_steps)
        path = write_ratio_file(
            outputs.calibration, config.ratio_table_key, config.sample_steps, config.sample_shift, ratios, stds, cos_dists,
            meta={"prompt": config.prompt, "checkpoint": str(config.ckpt_dir), **calibration_settings(config)},
        )
        png = plot_calibration(Path(outputs.calibration).with_suffix(".png"), records,
                               title=f"{config.task.name} {config.sample_steps} steps")
        return {"ratio_file": str(path), "plot": str(png), "forwards": len(records)}
