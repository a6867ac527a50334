"""The JSON manifest written beside each video: enough to reproduce and audit the run."""
from __future__ import annotations

import platform
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.checkpoint import CheckpointInfo
    from launcher.config import RunConfig
    from launcher.wan.pipeline import Result
    from magcache.ratios import RatioTable

MANIFEST_VERSION = 1


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("magcache-launch", "torch", "diffusers", "transformers", "accelerate", "safetensors", "yunchang"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def flags_of(config: "RunConfig") -> dict[str, Any]:
    """Every resolved flag, JSON-friendly (the task as its name, paths as strings)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "task":
            value = value.name
        elif f.name == "magcache":
            value = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(value).items()}
        elif isinstance(value, Path):
            value = str(value)
        elif f.name == "quantization":
            value = value.describe()
        elif f.name == "loras":
            value = [{"file": str(s.path), "scale": s.scale, "expert": s.expert} for s in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def magcache_section(config: "RunConfig", decisions: list[dict[str, Any]], table: "RatioTable | None") -> dict[str, Any]:
    total = len(decisions)
    skipped = [d["index"] for d in decisions if d["skip"]]
    by_branch = {"cond": 0, "uncond": 0}
    by_expert: dict[str, int] = {e: 0 for e in config.task.experts}
    for d in decisions:
        if d["skip"]:
            by_branch[d["branch"]] += 1
            by_expert[d["expert"]] = by_expert.get(d["expert"], 0) + 1
    computed = total - len(skipped)
    return {
        "enabled": config.magcache.enabled,
        "calibration": config.magcache.calibration,
        "target_speedup": config.magcache.target_speedup,
        "thresh": config.magcache.thresh,
        "thresh_from": config.magcache.thresh_from,
        "K": config.magcache.K,
        "retention_ratio": config.magcache.retention_ratio,
        "split": config.magcache.split,
        "reset_at_switch": config.magcache.reset_at_switch,
        "ratio_table": None if table is None else {"key": table.key, "source": table.source,
                                                   "sample_steps": table.sample_steps},
        "total_forwards": total,
        "computed_forwards": computed,
        "skipped_forwards": skipped,
        "skipped_count": len(skipped),
        "skipped_by_branch": by_branch,
        "skipped_by_expert": by_expert,
        "forward_speedup": total / computed if computed else float("inf"),
        "decisions": decisions,
    }


def build_manifest(
    *,
    config: "RunConfig",
    info: "CheckpointInfo",
    world: dict[str, Any],
    seed: int,
    result: "Result",
    decisions: list[dict[str, Any]],
    table: "RatioTable | None",
    files: dict[str, Any],
    peak_memory: list[dict[str, Any]],
    load_seconds: float,
    calibration: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    vae_decode: dict[str, Any] | None = None,
    loras: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "video": files.get("video"),
        "sha256": files.get("video_sha256"),
        "task": config.task.name,
        "prompt": config.prompt,
        "seed": seed,
        "flags": flags_of(config),
        "output": {"frames": files.get("video_frames"), "size": files.get("video_size"),
                   "fps": config.task.sample_fps, **{k: v for k, v in files.items() if k not in ("video", "video_sha256")}},
        "latent_shape": list(result.latents.shape),
        "seq_len": result.seq_len,
        "scheduler": {"solver": config.sample_solver, "steps": config.sample_steps, "shift": config.sample_shift,
                      "timesteps": result.timesteps, "experts": result.experts_per_step},
        "world": world,
        "checkpoint": {"dir": str(info.root), "layout": info.layout, "num_heads": info.num_heads,
                       "in_channels": info.in_channels, "vae": info.vae_version,
                       "prequantized": {e: p.format for e, p in info.prequantized.items()}},
        #: each LoRA merged at load time: file, sha256, scale, expert, formats and weights touched per expert
        "loras": loras or [],
        "magcache": magcache_section(config, decisions, table),
        "calibration": calibration,
        "timings_s": {"load": round(load_seconds, 3), **{k: round(v, 3) for k, v in result.timings.items()}},
        "peak_memory_mb": peak_memory,
        "vae_decode": vae_decode,
        "versions": package_versions(),
        "warnings": warnings or [],
    }
