"""Assemble the loaded models for one run: which device, which dtype, which sharding.

The checkpoint readers (`launcher.checkpoints`) know files; the parallel room knows meshes; this
module decides, for a RunConfig and a runtime, where each module lives and in which dtype —
following the official rules (DiT float32 unless --convert_model_dtype, autocast to the compute
dtype on GPU, T5 in the compute dtype, VAE always float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from launcher.checkpoints import CheckpointInfo, load_text_encoder, load_tokenizer, load_transformer, load_vae
from launcher.sharded_loading import load_sharded_text_encoder, load_sharded_transformer
from launcher.config import RunConfig
from launcher.dit import SequenceSharding, WanDiT
from launcher.pipeline import Models

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where and how the modules run on this rank."""

    device: torch.device
    compute_dtype: torch.dtype
    dit_param_dtype: torch.dtype
    text_device: torch.device
    autocast: bool
    #: official --offload_model: park idle experts (and T5) on the CPU; only meaningful on a GPU
    offload_model: bool


def resolve_device(requested: str | None, local_rank: int) -> torch.device:
    """--device, else cuda:LOCAL_RANK (modulo visible GPUs, for Slurm's per-task masks), else cpu."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def placement_for(cfg: RunConfig, *, local_rank: int = 0, world_size: int = 1,
                  device: torch.device | None = None) -> Placement:
    """`device`: the one the process group already bound this rank to, if any."""
    if device is None or (cfg.device and torch.device(cfg.device).index is not None):
        device = resolve_device(cfg.device, local_rank)
    on_gpu = device.type == "cuda"
    compute = DTYPES[cfg.dtype] if cfg.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    param = compute if cfg.convert_model_dtype else torch.float32
    # official: offload defaults to True on one GPU and False with several; it only matters on a GPU
    offload = (cfg.offload_model if cfg.offload_model is not None else world_size == 1) and on_gpu
    return Placement(
        device=device,
        compute_dtype=compute,
        dit_param_dtype=param,
        text_device=torch.device("cpu") if cfg.t5_cpu else device,
        autocast=on_gpu and compute != param,
        offload_model=offload,
    )


def load_models(
    cfg: RunConfig,
    info: CheckpointInfo,
    placement: Placement,
    *,
    sharding: SequenceSharding | None = None,
    fsdp_mesh: "DeviceMesh | None" = None,
) -> Models:
    """Every module of the task, on this rank, ready for `WanPipeline`.

    With `fsdp_mesh` (--dit_fsdp / --t5_fsdp over the sp group) the blocks are built on meta,
    sharded, and each rank reads only its rows of each block weight from disk.
    """
    offload_experts = placement.offload_model and len(cfg.task.experts) > 1 and not (cfg.dit_fsdp and fsdp_mesh)
    offload_t5 = placement.offload_model and placement.text_device.type == "cuda" and not (cfg.t5_fsdp and fsdp_mesh)
    experts: dict[str, WanDiT] = {}
    for i, name in enumerate(cfg.task.experts):
        if cfg.dit_fsdp and fsdp_mesh is not None:
            model = load_sharded_transformer(info, name, dtype=placement.dit_param_dtype,
                                             device=placement.device, mesh=fsdp_mesh)
        else:
            # with offload only the first-used expert starts on the GPU (high noise runs first)
            dev = placement.device if (i == 0 or not offload_experts) else torch.device("cpu")
            model = load_transformer(info, name, dtype=placement.dit_param_dtype, device=dev)
        experts[name] = WanDiT(model, sharding)
    if cfg.t5_fsdp and fsdp_mesh is not None:
        text_encoder = load_sharded_text_encoder(info, dtype=placement.compute_dtype, device=placement.device,
                                                 mesh=fsdp_mesh)
    else:
        text_encoder = load_text_encoder(info, dtype=placement.compute_dtype,
                                         device="cpu" if offload_t5 else placement.text_device)
    vae, _ = load_vae(info, device=placement.device)
    return Models(
        task=cfg.task,
        tokenizer=load_tokenizer(info),
        text_encoder=text_encoder,
        vae=vae,
        experts=experts,
        device=placement.device,
        text_device=placement.text_device,
        dit_dtype=placement.compute_dtype,
        autocast=placement.autocast,
        offload_idle_expert=offload_experts,
        offload_text_encoder=offload_t5,
    )
