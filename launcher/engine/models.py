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
from launcher.engine.host_memory import host_modules, plan_host_memory
from launcher.engine.placement import Placement
from launcher.wan.dit import compile_blocks
from quant.source import quantizing
from launcher.wan.parallelize import ParallelWan, parallelize_wan
from launcher.wan.quantize import quantize_model, step_switch
from launcher.wan.residency import HostResident
from launcher.wan.threads import cpu_phase
from launcher.wan.pipeline import Models

if TYPE_CHECKING:
    from parallel.mesh import ParallelMesh


def _host_homes(par: ParallelWan, placement: Placement, *, pin: bool) -> dict[str, HostResident]:
    """Experts that move between host and GPU get a host home once, at load (pinned where
    `plan_host_memory` found room: faster swaps); an expert loaded on the GPU goes back there
    after its host copy is made."""
    memory = placement.memory
    # the GPU is any device but the CPU (the dry run's stands on the meta device)
    if placement.device.type == "cpu" or par.dit_sharded or not (memory.swap_experts or memory.park_dit_before_decode):
        return {}
    homes = {}
    for name, dit in par.experts.items():
        on_gpu = dit.model.patch_embedding.weight.device.type == placement.device.type
        homes[name] = HostResident(dit.model, pin=pin)
        if on_gpu:
            homes[name].to(placement.device)
    return homes


def load_models(config: RunConfig, info: CheckpointInfo, placement: Placement,
                mesh: "ParallelMesh | None" = None, loras: LoraPlan | None = None) -> tuple[Models, ParallelWan]:
    """`_load_models` with the rank's cores: reading, dtype conversion and the LoRA merge are CPU work."""
    with cpu_phase(placement.device):
        return _load_models(config, info, placement, mesh, loras)


def _load_models(config: RunConfig, info: CheckpointInfo, placement: Placement,
                 mesh: "ParallelMesh | None", loras: LoraPlan | None) -> tuple[Models, ParallelWan]:
    """Every module of the task on this rank, ready for `WanPipeline`, and how they were split.

    `loras` are merged into each expert's tensors as they are read (after sharding: an FSDP rank
    merges only the rows it holds), so the modules never carry an adapter.
    """
    experts = {name: build_transformer_on_meta(info, name, placement.dit_param_dtype) for name in config.task.experts}
    # quantized linears go in on meta, before FSDP2 shards: each rank then quantizes only its rows
    quantized = {name: quantize_model(model, config.quantization, name) for name, model in experts.items()}
    text_encoder = build_text_encoder_on_meta(info, placement.text_dtype)
    half = placement.compute_dtype if placement.autocast else None
    par = parallelize_wan(experts, text_encoder, mesh, dit_fsdp=config.dit_fsdp, t5_fsdp=config.t5_fsdp,
                          dit_compute_dtype=half, attention=placement.attention,
                          vae_parallel=config.vae_parallel != "off")
    if par.dit_sharded and half is not None:
        # official FSDP's MixedPrecision covers the whole DiT: the unsharded root pieces (patch and
        # time embeddings, head) are used in the half dtype as well (computed in float32 where
        # official computes in float32)
        for model in experts.values():
            set_meta_dtypes(model, lambda key, model=model: half if not key.startswith("blocks.")
                            else model.get_parameter(key).dtype)

    pin, _ = plan_host_memory(config, placement, host_modules(
        placement, experts.values(), text_encoder, dit_sharded=par.dit_sharded, t5_sharded=par.t5_sharded))
    if config.compile:
        compile_blocks(par.experts.values())
    memory = placement.memory
    cpu = torch.device("cpu")
    for name, dit in par.experts.items():
        # official init_on_cpu: created on the CPU, the active expert moves to the GPU at its first step
        device = placement.device if par.dit_sharded or memory.dit_load == "gpu" else cpu
        source = quantizing(with_loras(transformer_source(info, name), loras, name), quantized[name][0])
        load_module(dit.model, source, device=device)  # quantized after the LoRA merge
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
        residency=_host_homes(par, placement, pin=pin),
        at_step=step_switch(config.quantization, (p for _, p in quantized.values() if p is not None)),
    )
    return models, par
