"""Which module sits on the GPU when: the official memory policy as one pure function.

Official Wan2.2 (`wan/text2video.py`, `image2video.py`, `textimage2video.py` @ 42bf4cf; see
docs/pipeline_facts.md) decides with two switches. `offload_model` (generate.py: True on one GPU,
False with several, unless given) parks T5 after encoding and every DiT before VAE decode.
`init_on_cpu` (True unless sequence parallel, --dit_fsdp or --t5_fsdp) loads the DiTs on the CPU
and, like `offload_model`, keeps only the active expert on the GPU at each step
(`_prepare_model_for_timestep`: `if offload_model or self.init_on_cpu`). So one GPU with
`--offload_model False`, CFG-parallel at ulysses 1 and batch's data-parallel replicas all still
swap experts: two A14B experts never share one GPU unless the model is sharded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Where = Literal["cpu", "gpu"]


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """Residency of each module on this rank; all "cpu"/False off the GPU (nothing to save there)."""

    #: official offload_model, resolved (True on one GPU unless given)
    offload_model: bool
    #: where unsharded DiT experts are created (official init_on_cpu: on the CPU, moved at step 0)
    dit_load: Where
    #: only the active expert on the GPU; before each step the others go to the CPU (also a single ti2v DiT
    #: loaded on the CPU moves to the GPU at step 0)
    swap_experts: bool
    #: every DiT to the CPU and the CUDA cache emptied before VAE decode (frees the GPU for the decoder)
    park_dit_before_decode: bool
    #: where T5 lives between prompts, and where it encodes
    t5_home: Where
    t5_runs_on: Where


def memory_policy(*, on_gpu: bool, offload_model: bool | None, world_size: int, sp: int, dit_fsdp: bool,
                  t5_fsdp: bool, t5_cpu: bool) -> MemoryPolicy:
    """The official rules for this rank's flags and world (`dit_fsdp`/`t5_fsdp`: blocks actually sharded).

    One deviation: official would also move FSDP-sharded DiTs to the CPU with --offload_model True;
    sharded modules stay where FSDP put them here (moving DTensor shards defeats the sharding).
    """
    offload = (offload_model if offload_model is not None else world_size == 1) and on_gpu
    init_on_cpu = on_gpu and not (t5_fsdp or dit_fsdp or sp > 1)
    swap = on_gpu and (offload or init_on_cpu) and not dit_fsdp
    if not on_gpu or t5_cpu:
        t5_home, t5_runs_on = "cpu", "cpu"
    elif t5_fsdp:
        t5_home, t5_runs_on = "gpu", "gpu"
    else:
        t5_home, t5_runs_on = ("cpu" if offload else "gpu"), "gpu"
    return MemoryPolicy(
        offload_model=offload,
        dit_load="cpu" if (init_on_cpu or not on_gpu) and not dit_fsdp else "gpu",
        swap_experts=swap,
        park_dit_before_decode=offload and not dit_fsdp,
        t5_home=t5_home,  # type: ignore[arg-type]
        t5_runs_on=t5_runs_on,  # type: ignore[arg-type]
    )
