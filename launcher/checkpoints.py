"""Find, validate and load a Wan2.2 checkpoint in the official or the diffusers layout.

`inspect_checkpoint` reads only configs, safetensors headers and `.pth` pickles (mmap, weights_only)
so the CLI can refuse a bad checkpoint in one line before any weight is read. Loaders build the
diffusers/transformers modules on meta and assign tensors read lazily from `TensorSource`s, keyed by
target names whatever the layout (official keys are renamed by `launcher.keymaps`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from launcher.checkpoint_files import CheckpointError, read_json, require_dir
from launcher.checkpoint_layouts import DIFFUSERS_EXPERT_FOLDERS, inspect_diffusers, inspect_official
from launcher.keymaps import T5_TIED_ALIASES
from launcher.tasks import TASKS, TaskSpec
from launcher.tensor_sources import TensorSource, WeightFiles, open_source

__all__ = [
    "DIFFUSERS_EXPERT_FOLDERS", "CheckpointError", "build_transformer_on_meta", "transformer_dtype_for", "CheckpointInfo", "Layout", "TensorSource", "WeightFiles",
    "detect_layout", "inspect_checkpoint", "load_text_encoder", "load_tokenizer", "load_transformer", "load_vae",
    "t5_source", "transformer_source", "vae_source",
]

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
    for expert, cfg in info.transformer_configs.items():
        where = info.transformer_weights[expert].files[0].parent
        n_in, n_out = cfg["in_channels"], cfg["out_channels"]
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
    for expert, cfg in info.transformer_configs.items():
        dit = _meta_shapes(partial(WanTransformer3DModel.from_config, cfg))
        _compare(dit, info.transformer_weights[expert], "DiT")
    t5 = _meta_shapes(lambda: UMT5EncoderModel(UMT5Config(**info.t5_config)))
    _compare({k: v for k, v in t5.items() if k not in T5_TIED_ALIASES}, info.t5_weights, "umt5")
    _compare(_meta_shapes(partial(AutoencoderKLWan.from_config, info.vae_config)), info.vae_weights, "VAE")


def transformer_source(info: CheckpointInfo, expert: str) -> TensorSource:
    """diffusers `WanTransformer3DModel` key -> tensor, read lazily."""
    if expert not in info.transformer_weights:
        raise KeyError(f"no expert {expert!r} in this {info.task} checkpoint; have {sorted(info.transformer_weights)}")
    return open_source(info.transformer_weights[expert])


def t5_source(info: CheckpointInfo) -> TensorSource:
    """`UMT5EncoderModel` key -> tensor (without the tied `encoder.embed_tokens.weight`), read lazily."""
    return open_source(info.t5_weights)


def vae_source(info: CheckpointInfo) -> TensorSource:
    """`AutoencoderKLWan` key -> tensor, read lazily."""
    return open_source(info.vae_weights)


def _state_dict(source: TensorSource, device: torch.device | str,
                dtype_for: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
    # copy=True: a .pth source hands out mmap-backed tensors; the module must not keep the file mapped
    return {k: source.get(k).to(device=device, dtype=dtype_for(k), copy=True) for k in source.keys()}


def build_transformer_on_meta(info: CheckpointInfo, expert: str) -> WanTransformer3DModel:
    """Parameters on meta; the RoPE tables (non-persistent buffers) stay real."""
    with init_empty_weights():
        return WanTransformer3DModel.from_config(info.transformer_configs[expert])


def transformer_dtype_for(model: WanTransformer3DModel, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """`dtype` for every weight except diffusers' `_keep_in_fp32_modules` (as `from_pretrained` does)."""
    keep = model._keep_in_fp32_modules or []

    def dtype_for(key: str) -> torch.dtype:
        return torch.float32 if any(m in key.split(".") for m in keep) else dtype

    return dtype_for


def load_transformer(info: CheckpointInfo, expert: str, *, dtype: torch.dtype,
                     device: torch.device | str) -> WanTransformer3DModel:
    """One DiT expert in `dtype`, except diffusers' `_keep_in_fp32_modules` (as `from_pretrained` does)."""
    model = build_transformer_on_meta(info, expert)
    dtype_for = transformer_dtype_for(model, dtype)
    with transformer_source(info, expert) as source:
        model.load_state_dict(_state_dict(source, device, dtype_for), strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder(info: CheckpointInfo, *, dtype: torch.dtype, device: torch.device | str) -> UMT5EncoderModel:
    """umt5 encoder with every weight in `dtype`.

    All of it, `wo` included: the official T5 runs wholly in bf16, while transformers' `from_pretrained`
    would keep `wo` in float32 (`_keep_in_fp32_modules`, a T5-fp16 overflow fix).
    """
    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config(**info.t5_config))
    with t5_source(info) as source:
        result = model.load_state_dict(_state_dict(source, device, lambda _: dtype), strict=False, assign=True)
    if set(result.missing_keys) != set(T5_TIED_ALIASES) or result.unexpected_keys:
        raise CheckpointError(f"{info.t5_weights.files[0]}: umt5 keys do not match the model (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); re-download it")
    model.tie_weights()  # encoder.embed_tokens.weight is shared.weight
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(info: CheckpointInfo) -> PreTrainedTokenizerBase:
    """The checkpoint's own umt5 tokenizer (no download)."""
    return AutoTokenizer.from_pretrained(str(info.tokenizer_dir), local_files_only=True)


def load_vae(info: CheckpointInfo, *, device: torch.device | str) -> tuple[AutoencoderKLWan, str]:
    """(VAE, '2.1' or '2.2'), always float32 like the official `Wan2_{1,2}_VAE`."""
    with init_empty_weights():
        model = AutoencoderKLWan.from_config(info.vae_config)
    with vae_source(info) as source:
        model.load_state_dict(_state_dict(source, device, lambda _: torch.float32), strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False), info.vae_version
