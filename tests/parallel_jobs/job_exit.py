"""Exit stress: a collective on a global tensor immediately before the context ends.

This is the shape that aborted ~1 run in 3 with a plain destroy_process_group(): a gloo worker
thread was still freeing that Work (whose tensor has a live Python object) when the interpreter
started finalizing. After DistContext.shutdown no gloo thread may be left at all, which is what
makes the exit deterministic; the job reports the thread count before init and after shutdown.
"""
import os

import torch
import torch.distributed as dist

from parallel.dist import init_distributed
from parallel.launch import detect_launch
from parallel.mesh import ParallelDims
from spawn import emit


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


before = threads()
with init_distributed(detect_launch(), device_preference="cpu", timeout=60) as ctx:
    pm = ParallelDims.from_world(ctx.world_size, ulysses=ctx.world_size, cfg=1).build(ctx)
    during = threads()
    value = torch.ones(4)
    dist.all_reduce(value, group=pm.sp_group)
emit(dict(rank=ctx.rank, threads_before=before, threads_during=during, threads_after=threads()))
