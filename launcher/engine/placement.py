"""Where and in which dtype each module runs on this rank, by the official rules.

DiT float32 unless --convert_model_dtype, autocast to the compute dtype on GPU, T5 in bfloat16 on
GPU whatever --dtype says (official `t5_dtype`; the compute dtype on CPU), VAE always float32.
Which module is on the GPU when is `launcher.planner.memory`.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from launcher.config import RunConfig
from launcher.errors import UsageError
from launcher.planner.memory import MemoryPolicy, memory_policy
from parallel.attention import AttentionBackendError, Host, resolve

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where and how the modules run on this rank."""

    device: torch.device
    compute_dtype: torch.dtype
    dit_param_dtype: torch.dtype
    #: where T5 encodes (the CPU with --t5_cpu)
    text_device: torch.device
    text_dtype: torch.dtype
    autocast: bool
    memory: MemoryPolicy
    #: the attention kernel that runs (parallel.attention.resolve of --attention on this device)
    attention: str = "sdpa"


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


def placement_for(config: RunConfig, *, local_rank: int = 0, world_size: int = 1, sp: int = 1,
                  device: torch.device | None = None) -> Placement:
    """`device`: the one the process group already bound this rank to, if any; `sp`: the sequence group's size."""
    if device is None or (config.device and torch.device(config.device).index is not None):
        device = resolve_device(config.device, local_rank)
    on_gpu = device.type == "cuda"
    compute = DTYPES[config.dtype] if config.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    param = compute if config.convert_model_dtype else torch.float32
    memory = memory_policy(on_gpu=on_gpu, offload_model=config.offload_model, world_size=world_size, sp=sp,
                           dit_fsdp=config.dit_fsdp and sp > 1, t5_fsdp=config.t5_fsdp and sp > 1,
                           t5_cpu=config.t5_cpu)
    try:
        attention = resolve(config.attention, Host.of(device, compute))
    except AttentionBackendError as e:
        raise UsageError(str(e)) from None
    return Placement(
        attention=attention,
        device=device,
        compute_dtype=compute,
        dit_param_dtype=param,
        text_device=torch.device("cpu") if memory.t5_runs_on == "cpu" else device,
        text_dtype=torch.bfloat16 if on_gpu else compute,
        # official autocasts to param_dtype whenever it is not float32, also with --convert_model_dtype
        autocast=compute != torch.float32,
        memory=memory,
    )


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak host RSS (and CUDA allocations) of this process so far, in MiB."""
    out = {"host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out
