"""FSDP2-sharded loading of the DiT experts and T5 (--dit_fsdp / --t5_fsdp).

Built on meta, blocks sharded over the sp group, then each rank reads only its rows of every
block weight from the mmap'd checkpoint (`parallel.fsdp.load_sharded`): host memory per rank
is about 1/N of the blocks plus the replicated root pieces (embeddings, head), never a full copy.
"""
from __future__ import annotations

from collections.abc import KeysView
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from launcher.checkpoints import (
    CheckpointInfo,
    build_transformer_on_meta,
    t5_source,
    transformer_dtype_for,
    transformer_source,
)
from launcher.keymaps import T5_TIED_ALIASES

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel
    from torch.distributed.device_mesh import DeviceMesh


def _set_meta_dtypes(model: nn.Module, dtype_for: Callable[[str], torch.dtype]) -> None:
    """Give every (meta) parameter the dtype it will be loaded in, before FSDP2 flattens nothing."""
    for mod_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            key = f"{mod_name}.{name}" if mod_name else name
            wanted = dtype_for(key)
            if param.dtype != wanted:
                module._parameters[name] = nn.Parameter(param.to(wanted), requires_grad=False)


class _AliasedSource:
    """A tensor source that also answers for tied aliases (UMT5's embed_tokens is `shared`)."""

    def __init__(self, source, aliases: dict[str, str]) -> None:
        self._source = source
        self.fresh_tensors = getattr(source, "fresh_tensors", False)
        self._aliases = aliases
        self._keys = {k: None for k in (*source.keys(), *aliases)}

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


def load_sharded_transformer(info: CheckpointInfo, expert: str, *, dtype: torch.dtype, device: torch.device,
                             mesh: "DeviceMesh") -> "WanTransformer3DModel":
    """One expert with every transformer block FSDP2-sharded over `mesh`; root pieces replicated."""
    from parallel.fsdp import load_sharded, shard_modules

    model = build_transformer_on_meta(info, expert)
    _set_meta_dtypes(model, transformer_dtype_for(model, dtype))
    model.eval().requires_grad_(False)
    shard_modules(model.blocks, mesh)
    with transformer_source(info, expert) as source:
        load_sharded(model, source, device=device)
    model.rope.to(device)  # non-persistent RoPE tables were built on the CPU
    return model


def load_sharded_text_encoder(info: CheckpointInfo, *, dtype: torch.dtype, device: torch.device,
                              mesh: "DeviceMesh") -> UMT5EncoderModel:
    """umt5 with each encoder block FSDP2-sharded over `mesh` (all of it in `dtype`, as official)."""
    from parallel.fsdp import load_sharded, shard_modules

    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config(**info.t5_config))
    _set_meta_dtypes(model, lambda _key: dtype)
    model.eval().requires_grad_(False)
    shard_modules(model.encoder.block, mesh)
    with t5_source(info) as source:
        load_sharded(model, _AliasedSource(source, T5_TIED_ALIASES), device=device)
    model.tie_weights()
    return model
