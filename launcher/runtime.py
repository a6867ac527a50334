"""The process-level runtime of a run: launch environment, process groups, mesh, placement.

Everything rank-related that the session needs is here, behind a few methods, so the session
and pipeline never compute ranks or call collectives themselves.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from launcher.config import RunConfig, UsageError
from launcher.dit import LocalSequence, SequenceSharding
from launcher.models import Placement, placement_for
from launcher.pipeline import BranchExchange, SerialBranches


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak host RSS (and CUDA allocations) of this process so far, in MiB."""
    out = {"host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


@dataclass
class Runtime:
    placement: Placement
    rank: int = 0
    world_size: int = 1
    launch_kind: str = "single"
    sharding: SequenceSharding = field(default_factory=LocalSequence)
    exchange: BranchExchange = field(default_factory=SerialBranches)
    shard_blocks: Callable[[torch.nn.Module], None] | None = None
    #: MagCache agreement among the ranks computing one branch (None: single process)
    sync: Callable[[bool], bool] | None = None
    #: SUM over the sequence group, for calibration statistics (None: single process)
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    is_output_rank: bool = True
    decodes: bool = True
    mesh: dict[str, int] = field(default_factory=lambda: {"dp": 1, "cfg": 1, "sp": 1})
    #: this rank's data-parallel group (batch items are spread over groups) and their count
    dp_rank: int = 0
    dp_size: int = 1
    _shutdown: Callable[[bool], None] | None = None

    def describe(self) -> dict[str, Any]:
        return {"size": self.world_size, "launch": self.launch_kind, "mesh": dict(self.mesh),
                "device": str(self.placement.device), "dtype": str(self.placement.compute_dtype).replace("torch.", "")}

    def gather_decisions(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(local, key=lambda d: d["index"])

    def gather_records(self, local: list[Any]) -> list[Any]:
        return sorted(local, key=lambda r: r.index)

    def gather_peak_memory(self) -> list[dict[str, Any]]:
        return [{"rank": self.rank, **peak_memory_mb(self.placement.device)}]

    def broadcast_seed(self, seed: int) -> int:
        return seed

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (CPU-side, small objects only)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def shutdown(self, clean: bool = True) -> None:
        """Tear down process groups; `clean=False` after a failure skips the final barrier."""
        if self._shutdown is not None:
            fn, self._shutdown = self._shutdown, None
            fn(clean)


def start_runtime(cfg: RunConfig, *, num_heads: int) -> Runtime:
    """Single process for now: no process group."""
    if num_heads % cfg.ulysses_size:
        raise UsageError(f"--ulysses_size {cfg.ulysses_size} does not divide the checkpoint's {num_heads} attention heads")
    if cfg.ulysses_size > 1 or cfg.cfg_parallel:
        raise UsageError("--ulysses_size > 1 and --cfg-parallel need several ranks: launch with torchrun or srun")
    return Runtime(placement=placement_for(cfg))
