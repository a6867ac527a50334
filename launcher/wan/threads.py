"""The CPU threads a rank may use during its CPU phases (load, dtype conversion, LoRA merge, T5 on the CPU).

torchrun sets OMP_NUM_THREADS=1 for every rank so that N ranks do not oversubscribe the cores
while they drive GPUs; torch then runs every CPU op single-threaded, and a CPU phase (an A14B load
with dtype conversion and a LoRA merge, a T5-XXL encode with --t5_cpu) takes minutes. During
those phases a rank uses its share of the node's cores, and the thread count in force before
(1 under torchrun) is restored after, so the GPU phases see what the launcher chose.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def ranks_per_node() -> int:
    """Ranks sharing this host (torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node), else 1."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0]
        if value.isdigit():
            return int(value)
    return 1


def rank_cores() -> int:
    """Cores this rank may use: its CPU affinity where the launcher bound it (srun --cpu-bind), else an
    equal share of the node's cores among the ranks on it."""
    allowed = len(os.sched_getaffinity(0))
    if allowed < (os.cpu_count() or allowed):
        return allowed  # already bound to its own cores
    return max(1, allowed // ranks_per_node())


@contextlib.contextmanager
def cpu_phase(run_device: torch.device | str, threads: int | None = None) -> Iterator[int]:
    """Run the body with this rank's cores (never fewer threads than already set); restore after.

    Only a run that computes on a GPU (`run_device`) gets them: a run all on the CPU keeps its thread
    count, because one thread per rank is the CPU stand-in for one GPU per rank and more threads would
    round the LoRA merge and T5 differently (N CPU ranks must equal one process)."""
    before = torch.get_num_threads()
    if torch.device(run_device).type == "cpu":
        yield before
        return
    n = max(before, rank_cores() if threads is None else threads)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
