"""A peer dies after the mesh is built: the survivor's collective fails, and the failure path
aborts every group (the teardown NCCL needs, run here on gloo) and leaves no gloo thread.

Reports, for the survivor: the error, seconds from the peer's death to the end of teardown,
which teardown ran, and the thread count before init and after teardown.
"""
import os
import signal
import time

import torch
import torch.distributed as dist

from parallel.dist import init_distributed
from parallel.launch import detect_launch
from parallel.mesh import ParallelDims
from spawn import emit


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


# torchrun SIGTERMs the survivors as soon as the peer exits; the survivor here must live to report
signal.signal(signal.SIGTERM, signal.SIG_IGN)
before = threads()
ctx = init_distributed(detect_launch(), device_preference="cpu", timeout=60)
error, started = None, None
try:
    with ctx:
        pm = ParallelDims.from_world(ctx.world_size, ulysses=ctx.world_size).build(ctx)
        fsdp = pm.fsdp_mesh()
        dist.all_reduce(torch.ones(1), group=pm.sp_group)
        dist.all_reduce(torch.ones(1), group=fsdp.get_group())
        if ctx.rank == 1:
            os._exit(3)
        started = time.monotonic()
        del fsdp
        dist.all_reduce(torch.ones(1), group=pm.sp_group)
        dist.all_reduce(torch.ones(1), group=pm.sp_group)
except Exception as e:  # noqa: BLE001 - the job reports whatever the dead peer caused
    error = type(e).__name__
emit(dict(rank=ctx.rank, error=error, seconds=time.monotonic() - started, ended_by=ctx.ended_by,
          initialized=dist.is_initialized(), threads_before=before, threads_after=threads()))
