"""Host memory a rank's weights will take, predicted from the meta-built modules before any load.

Every rank of a node keeps its own host copies (experts homed on the CPU, T5 on the CPU), so the
need is this rank's bytes times the ranks on the node. Against /proc/meminfo:
- it fits with a margin to spare: experts are pinned (registered in place, `launcher.wan.residency`);
- it fits only without the margin, or only with swap: pageable host memory, one warning line;
- it does not fit at all: exit 2 before loading, naming the flags that shrink it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from launcher.config import RunConfig, UsageError
from launcher.engine.placement import Placement
from launcher.wan.threads import ranks_per_node

log = logging.getLogger(__name__)

#: host memory left to the OS, page cache and activations before pinning is chosen
PIN_MARGIN_BYTES = 4 * 2**30


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's distinct parameter and buffer storages (works on the meta device)."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.device.type, t.untyped_storage().data_ptr()) if t.device.type != "meta" else ("meta", id(t))
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


@dataclass(frozen=True, slots=True)
class HostMemory:
    """What the kernel says is free: MemAvailable and SwapFree, in bytes."""

    available: int
    swap_free: int

    @classmethod
    def read(cls, meminfo: Path = Path("/proc/meminfo")) -> HostMemory:
        fields = {}
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024  # kB
        return cls(available=fields["MemAvailable"], swap_free=fields.get("SwapFree", 0))


def host_modules(placement: Placement, experts: Iterable[nn.Module], text_encoder: nn.Module, *,
                 dit_sharded: bool, t5_sharded: bool) -> list[nn.Module]:
    """The modules whose home is this rank's host memory (by the placement's memory policy)."""
    memory = placement.memory
    on_gpu = placement.device.type == "cuda"
    out = []
    if not dit_sharded and (not on_gpu or memory.dit_load == "cpu" or memory.swap_experts
                            or memory.park_dit_before_decode):
        out += list(experts)
    if not t5_sharded and (not on_gpu or memory.t5_home == "cpu" or memory.t5_runs_on == "cpu"):
        out.append(text_encoder)
    return out


def helping_flags(config: RunConfig, placement: Placement, ranks: int) -> list[str]:
    out = []
    if placement.dit_param_dtype == torch.float32 and placement.compute_dtype != torch.float32:
        out.append("--convert_model_dtype (DiT weights in the compute dtype: half the bytes)")
    if config.t5_cpu:
        out.append("leave out --t5_cpu (T5 stays on the GPU)")
    if ranks > 1:
        out.append(f"fewer ranks per node (each of the {ranks} keeps its own host copy)")
    if not out:
        out.append("a host with more memory")
    return out


def decide_pinning(need: int, free: HostMemory, *, pin: bool, helps: list[str]) -> bool:
    """Whether to pin the host homes; warns once when falling back to pageable memory, and raises
    UsageError (exit 2) when even pageable memory and swap cannot hold `need` bytes."""
    gib = 2**30
    if need > free.available + free.swap_free:
        raise UsageError(f"this run needs {need / gib:.1f} GiB of host memory for its weights but "
                         f"{free.available / gib:.1f} GiB are available (+{free.swap_free / gib:.1f} GiB swap); "
                         f"try {'; '.join(helps)}")
    if pin and need > free.available - PIN_MARGIN_BYTES:
        log.warning("host weights need %.1f GiB of %.1f GiB available (margin %.0f GiB): they stay pageable, "
                    "expert swaps are slower; %s would make room to pin them",
                    need / gib, free.available / gib, PIN_MARGIN_BYTES / gib, helps[0])
        return False
    return pin


def plan_host_memory(config: RunConfig, placement: Placement, modules: list[nn.Module], *,
                     free: HostMemory | None = None) -> tuple[bool, int]:
    """(pin the experts' host homes?, predicted host bytes on this node) before anything is loaded."""
    ranks = ranks_per_node()
    need = ranks * sum(module_bytes(m) for m in modules)
    if not need:
        return placement.device.type == "cuda", 0
    free = HostMemory.read() if free is None else free
    pin = decide_pinning(need, free, pin=placement.device.type == "cuda",
                         helps=helping_flags(config, placement, ranks))
    return pin, need
