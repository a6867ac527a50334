"""Find and validate a Wan2.2 checkpoint in the official or the diffusers layout (loading: `.load`).

`inspect_checkpoint` reads only configs, safetensors headers and `.pth` pickles (mmap, weights_only)
so the CLI can refuse a bad checkpoint in one line before any weight is read. The folder:
`files` (reading, safety), `layouts` (official vs diffusers), `keymaps` (official -> diffusers
names), `sources` (lazy tensor reads), `load` (modules built on meta, then filled).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from launcher.checkpoint.files import CheckpointError, read_json, require_dir
from launcher.checkpoint.layouts import DIFFUSERS_EXPERT_FOLDERS, inspect_diffusers, inspect_official
from launcher.checkpoint.keymaps import T5_TIED_ALIASES
from launcher.wan.tasks import TASKS, TaskSpec
from launcher.checkpoint.quantized import Prequantized
from launcher.checkpoint.sources import WeightFiles

__all__ = ["DIFFUSERS_EXPERT_FOLDERS", "CheckpointError", "CheckpointInfo", "Layout", "WeightFiles",
           "detect_layout", "inspect_checkpoint"]

Layout = Literal["official", "diffusers"]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """Everything needed to build and load the models, read without touching a weight."""

    root: Path
    layout: Layout
    task: str
    #: expert ("high"/"low" or "single") -> kwargs for `WanTransformer3DModel.from_config`
    transformer_configs: Mapping[str, dict[str, Any]]
    transformer_weights: Mapping[str, WeightFiles]
    num_heads: int
    in_channels: int
    out_channels: int
    #: kwargs for `UMT5Config`
    t5_config: dict[str, Any]
    t5_weights: WeightFiles
    vae_version: Literal["2.1", "2.2"]
    #: kwargs for `AutoencoderKLWan.from_config`
    vae_config: dict[str, Any]
    vae_weights: WeightFiles
    tokenizer_dir: Path
    #: expert -> its pre-quantized (FP8/INT8) DiT tensors; experts stored plain are absent
    prequantized: Mapping[str, Prequantized] = field(default_factory=dict)


def detect_layout(ckpt_dir: str | Path) -> Layout:
    """'diffusers' if `model_index.json`, 'official' if expert folders or a root WanModel config.json.

    Only the model markers decide; the T5/VAE/tokenizer files are checked by `inspect_checkpoint`,
    so a checkpoint missing one of them gets an error naming that file.
    """
    root = require_dir(Path(ckpt_dir), "checkpoint directory", "point --ckpt_dir at a Wan2.2 checkpoint")
    if (root / "model_index.json").is_file():
        return "diffusers"
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        return "official"
    if (root / "config.json").is_file() and read_json(root / "config.json").get("_class_name") == "WanModel":
        return "official"
    raise CheckpointError(
        f"{root}: neither model_index.json (diffusers layout) nor high_noise_model/ or a WanModel config.json "
        "(official layout); point --ckpt_dir at a Wan2.2 checkpoint"
    )


def inspect_checkpoint(ckpt_dir: str | Path, task: TaskSpec) -> CheckpointInfo:
    """Validate the checkpoint against `task` and describe it; raises `CheckpointError` (one line)."""
    root = Path(ckpt_dir)
    layout = detect_layout(root)
    parts = (inspect_official if layout == "official" else inspect_diffusers)(root, task)
    configs = parts["transformer_configs"]
    first = configs[task.experts[0]]
    info = CheckpointInfo(
        root=root, layout=layout, task=task.name, num_heads=first["num_attention_heads"],
        in_channels=first["in_channels"], out_channels=first["out_channels"], **parts,
    )
    _check_task(info, task)
    _check_shapes(info)
    return info


def _check_task(info: CheckpointInfo, task: TaskSpec) -> None:
    for expert, config in info.transformer_configs.items():
        where = info.transformer_weights[expert].files[0].parent
        n_in, n_out = config["in_channels"], config["out_channels"]
        if n_in != task.dit_in_channels:
            owners = [t for t, s in TASKS.items() if s.dit_in_channels == n_in]
            hint = f"pass --task {owners[0]} or " if owners else ""
            raise CheckpointError(
                f"{where}: DiT in_channels is {n_in}, but {task.name} expects {task.dit_in_channels}; "
                f"{hint}point --ckpt_dir at a {task.name} checkpoint"
            )
        if n_out != task.z_dim:
            raise CheckpointError(f"{where}: DiT out_channels is {n_out}, but {task.name} expects {task.z_dim}; "
                                  f"point --ckpt_dir at a {task.name} checkpoint")
    if info.vae_version != task.vae_version:
        raise CheckpointError(f"{info.vae_weights.files[0]}: a Wan{info.vae_version} VAE, but {task.name} needs the "
                              f"Wan{task.vae_version} VAE; point --ckpt_dir at a {task.name} checkpoint")


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare(expected: Mapping[str, tuple[int, ...]], weights: WeightFiles, what: str) -> None:
    """Every parameter present once with the configured shape; names the file and key on failure."""
    where = ", ".join(str(p) for p in weights.files[:1]) + (" ..." if len(weights.files) > 1 else "")
    missing = sorted(set(expected) - set(weights.shapes))
    unexpected = sorted(set(weights.shapes) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: {what} tensor {missing[0]!r} is missing ({len(missing)} in all); "
                              "the file is incomplete or of another model, re-download it")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected {what} tensor {unexpected[0]!r} ({len(unexpected)} in all); "
                              "the file is of another model, re-download it")
    for key, shape in weights.shapes.items():
        if tuple(shape) != expected[key]:
            path, stored = weights.locations[key]
            raise CheckpointError(f"{path}: tensor {stored!r} has shape {list(shape)} but the config needs "
                                  f"{list(expected[key])}; the file does not match its config, re-download it")


def _check_shapes(info: CheckpointInfo) -> None:
    for expert, config in info.transformer_configs.items():
        dit = _meta_shapes(partial(WanTransformer3DModel.from_config, config))
        _compare(dit, info.transformer_weights[expert], "DiT")
    t5 = _meta_shapes(lambda: UMT5EncoderModel(UMT5Config(**info.t5_config)))
    _compare({k: v for k, v in t5.items() if k not in T5_TIED_ALIASES}, info.t5_weights, "umt5")
    _compare(_meta_shapes(partial(AutoencoderKLWan.from_config, info.vae_config)), info.vae_weights, "VAE")
