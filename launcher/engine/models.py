"""Assemble one rank's models: build on meta -> parallelize -> load, in that order.

Each step has one owner: `launcher.checkpoint.load` builds and fills modules, `launcher.wan.parallelize`
decides how they are split over the ranks, `launcher.engine.placement` where and in which dtype
they live. Sharding before loading is what lets each rank read only its rows of every block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from launcher.checkpoint import CheckpointInfo
from launcher.checkpoint.load import (
    build_text_encoder_on_meta,
    build_transformer_on_meta,
    load_module,
    load_tokenizer,
    load_vae,
    set_meta_dtypes,
    t5_source,
    transformer_source,
)
from launcher.checkpoint.lora import LoraPlan, with_loras
from launcher.config import RunConfig
from launcher.engine.placement import Placement
from launcher.wan.dit import compile_blocks
from launcher.wan.parallelize import ParallelWan, parallelize_wan
from launcher.wan.residency import HostResident
from launcher.wan.pipeline import Models

if TYPE_CHECKING:
    from parallel.mesh import ParallelMesh


def _host_homes(par: ParallelWan, placement: Placement) -> dict[str, HostResident]:
    """Experts that move between host and GPU get a pinned host home once, at load (faster swaps);
    an expert loaded on the GPU goes back there after its host copy is made."""
    memory = placement.memory
    # the GPU is any device but the CPU (the dry run's stands on the meta device)
    if placement.device.type == "cpu" or par.dit_sharded or not (memory.swap_experts or memory.park_dit_before_decode):
        return {}
    homes = {}
    for name, dit in par.experts.items():
        on_gpu = dit.model.patch_embedding.weight.device.type == placement.device.type
        homes[name] = HostResident(dit.model, pin=True)
        if on_gpu:
            homes[name].to(placement.device)
    return homes


def load_models(config: RunConfig, info: CheckpointInfo, placement: Placement,
                mesh: "ParallelMesh | None" = None, loras: LoraPlan | None = None) -> tuple[Models, ParallelWan]:
    """Every module of the task on this rank, ready for `WanPipeline`, and how they were split.

    `loras` are merged into each expert's tensors as they are read (after sharding: an FSDP rank
    merges only the rows it holds), so the modules never carry an adapter.
    """
    experts = {name: build_transformer_on_meta(info, name, placement.dit_param_dtype) for name in config.task.experts}
    text_encoder = build_text_encoder_on_meta(info, placement.text_dtype)
    half = placement.compute_dtype if placement.autocast else None
    par = parallelize_wan(experts, text_encoder, mesh, dit_fsdp=config.dit_fsdp, t5_fsdp=config.t5_fsdp,
                          dit_compute_dtype=half)
    if par.dit_sharded and half is not None:
        # official FSDP's MixedPrecision covers the whole DiT: the unsharded root pieces (patch and
        # time embeddings, head) are used in the half dtype as well (computed in float32 where
        # official computes in float32)
        for model in experts.values():
            set_meta_dtypes(model, lambda key, model=model: half if not key.startswith("blocks.")
                            else model.get_parameter(key).dtype)

    if config.compile:
        compile_blocks(par.experts.values())
    memory = placement.memory
    cpu = torch.device("cpu")
    for name, dit in par.experts.items():
        # official init_on_cpu: created on the CPU, the active expert moves to the GPU at its first step
        device = placement.device if par.dit_sharded or memory.dit_load == "gpu" else cpu
        load_module(dit.model, with_loras(transformer_source(info, name), loras, name), device=device)
        if par.dit_sharded:
            dit.model.rope.to(device)  # the non-persistent RoPE tables were built on the CPU
        else:
            dit.model.to(device)
    t5_device = placement.device if par.t5_sharded or memory.t5_home == "gpu" else cpu
    load_module(text_encoder, t5_source(info), device=t5_device)
    text_encoder.tie_weights()  # encoder.embed_tokens.weight is shared.weight
    if not par.t5_sharded:
        text_encoder.to(t5_device)
    vae, _ = load_vae(info, device=placement.device)
    models = Models(
        task=config.task,
        tokenizer=load_tokenizer(info),
        text_encoder=text_encoder,
        vae=vae,
        experts=par.experts,
        device=placement.device,
        text_device=placement.text_device,
        dit_dtype=placement.compute_dtype,
        autocast=placement.autocast,
        swap_experts=memory.swap_experts,
        park_dit_before_decode=memory.park_dit_before_decode,
        offload_text_encoder=not par.t5_sharded and memory.t5_home != memory.t5_runs_on,
        residency=_host_homes(par, placement),
    )
    return models, par
