"""Build the modules on meta, then fill them from the checkpoint: loading only loads.

Every module is created on the meta device with each parameter already in the dtype it will hold,
so `launcher.wan.parallelize` can shard it before a byte is read; `load_module` then reads each
tensor once, and only this rank's rows of a parameter FSDP2 has sharded (`parallel.fsdp`).
"""
from __future__ import annotations

from collections.abc import Callable, KeysView
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from launcher.checkpoint import CheckpointInfo
from launcher.checkpoint.keymaps import T5_TIED_ALIASES
from launcher.checkpoint.quantized import prequantized_source
from launcher.checkpoint.sources import TensorSource, open_source

if TYPE_CHECKING:
    from parallel.fsdp import LoadStats


def transformer_source(info: CheckpointInfo, expert: str) -> TensorSource:
    """diffusers `WanTransformer3DModel` key -> tensor, read lazily."""
    if expert not in info.transformer_weights:
        raise KeyError(f"no expert {expert!r} in this {info.task} checkpoint; have {sorted(info.transformer_weights)}")
    return prequantized_source(open_source(info.transformer_weights[expert]), info.prequantized.get(expert))


def t5_source(info: CheckpointInfo) -> TensorSource:
    """`UMT5EncoderModel` key -> tensor (the tied `encoder.embed_tokens.weight` answered as `shared`)."""
    return _AliasedSource(open_source(info.t5_weights), T5_TIED_ALIASES)


def vae_source(info: CheckpointInfo) -> TensorSource:
    """`AutoencoderKLWan` key -> tensor, read lazily."""
    return open_source(info.vae_weights)


class _AliasedSource:
    """A tensor source that also answers for tied aliases (UMT5's embed_tokens is `shared`)."""

    def __init__(self, source: TensorSource, aliases: dict[str, str]) -> None:
        self._source = source
        self.fresh_tensors = getattr(source, "fresh_tensors", False)
        self._aliases = aliases
        self._keys = {k: None for k in (*source.keys(), *aliases)}

    def __enter__(self) -> "_AliasedSource":
        self._source.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._source.__exit__(*exc)

    def keys(self) -> KeysView[str]:
        return self._keys.keys()

    def _real(self, key: str) -> str:
        return self._aliases.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(self._real(key))

    def get(self, key: str) -> torch.Tensor:
        return self._source.get(self._real(key))

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._source.get_slice(self._real(key), start, stop)


def set_meta_dtypes(model: nn.Module, dtype_for: Callable[[str], torch.dtype]) -> None:
    """Give every (meta) parameter the dtype it will be loaded in, before FSDP2 sees it."""
    for mod_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            key = f"{mod_name}.{name}" if mod_name else name
            wanted = dtype_for(key)
            if param.dtype != wanted:
                module._parameters[name] = nn.Parameter(param.to(wanted), requires_grad=False)


def build_transformer_on_meta(info: CheckpointInfo, expert: str, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    """One expert's parameters on meta, every one in `dtype`; the RoPE tables (non-persistent) stay real.

    Every one: official `--convert_model_dtype` is `model.to(param_dtype)`, so the modulation tables,
    norms and time embedding are rounded too; diffusers' `from_pretrained` would keep those in
    float32 (`_keep_in_fp32_modules`). Our DiT forward computes them in float32 either way.
    """
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(info.transformer_configs[expert])
    set_meta_dtypes(model, lambda _key: dtype)
    return model.eval().requires_grad_(False)


def build_text_encoder_on_meta(info: CheckpointInfo, dtype: torch.dtype) -> UMT5EncoderModel:
    """umt5 on meta with every weight in `dtype`, `wo` included.

    The official T5 runs wholly in bf16, while transformers' `from_pretrained` would keep `wo` in
    float32 (`_keep_in_fp32_modules`, a T5-fp16 overflow fix).
    """
    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config(**info.t5_config))
    set_meta_dtypes(model, lambda _key: dtype)
    return model.eval().requires_grad_(False)


def load_module(model: nn.Module, source: TensorSource, *, device: torch.device | str) -> "LoadStats":
    """Fill a meta-built model from `source` onto `device`; FSDP2-sharded parameters get their rows only."""
    from parallel.fsdp import load_sharded

    with source:
        stats = load_sharded(model, source, device=device)
    return stats


def load_transformer(info: CheckpointInfo, expert: str, *, dtype: torch.dtype,
                     device: torch.device | str) -> WanTransformer3DModel:
    """One unsharded DiT expert with every weight in `dtype` on `device`."""
    model = build_transformer_on_meta(info, expert, dtype)
    load_module(model, transformer_source(info, expert), device=device)
    return model.to(device)


def load_text_encoder(info: CheckpointInfo, *, dtype: torch.dtype, device: torch.device | str) -> UMT5EncoderModel:
    """The unsharded umt5 encoder with every weight in `dtype` on `device`."""
    model = build_text_encoder_on_meta(info, dtype)
    load_module(model, t5_source(info), device=device)
    model.tie_weights()  # encoder.embed_tokens.weight is shared.weight
    return model.to(device)


def load_tokenizer(info: CheckpointInfo) -> PreTrainedTokenizerBase:
    """The checkpoint's own umt5 tokenizer (no download)."""
    return AutoTokenizer.from_pretrained(str(info.tokenizer_dir), local_files_only=True)


def load_vae(info: CheckpointInfo, *, device: torch.device | str) -> tuple[AutoencoderKLWan, str]:
    """(VAE, '2.1' or '2.2'), always float32 like the official `Wan2_{1,2}_VAE`."""
    with init_empty_weights():
        model = AutoencoderKLWan.from_config(info.vae_config)
    with vae_source(info) as source:
        # copy: a .pth source hands out mmap-backed tensors; the module must not keep the file mapped
        state = {k: source.get(k).to(device=device, dtype=torch.float32, copy=True) for k in source.keys()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False), info.vae_version
