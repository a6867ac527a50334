"""Mesh layout, MagCache agreement and CFG exchange on gloo; prints this rank's view.

Written as a flat script on purpose: the context, the mesh and the agree callable are module
globals, which is exactly how the exit abort used to happen (groups alive into interpreter exit).

Args: SP CFG [AGREE_CALLS] [RING]  (SP: the Ulysses degree)
"""
import sys
import time

import torch
import torch.distributed as dist

from parallel.cfg import exchange_predictions
from parallel.dist import agree_min, init_distributed, reduce_sum
from parallel.launch import detect_launch
from parallel.mesh import ParallelDims
from spawn import emit

sp, cfg = int(sys.argv[1]), int(sys.argv[2])
calls = int(sys.argv[3]) if len(sys.argv) > 3 else 0
ring = int(sys.argv[4]) if len(sys.argv) > 4 else 1

with init_distributed(detect_launch(), device_preference="cpu", timeout=60) as ctx:
    pm = ParallelDims.from_world(ctx.world_size, ulysses=sp, cfg=cfg, ring=ring).build(ctx)
    names = ("dp", "cfg", "ring", "ulysses", "sp", "replica")
    ranks = {n: dist.get_process_group_ranks(pm.group(n)) if pm.dims.degree(n) > 1 else [ctx.rank] for n in names}
    backends = {n: dist.get_backend(pm.group(n)) for n in names if pm.group(n) is not None}
    mesh = pm.device_mesh
    mesh_dims = list(mesh.mesh_dim_names) if mesh is not None else []
    # the DeviceMesh wraps the enumerated groups themselves, and the flattened dims are 1-D meshes of theirs
    wraps = all(mesh.get_group(n) is pm.group(n) for n in mesh_dims) and all(
        pm.submesh(n).get_group() is pm.group(n) for n in ("sp", "replica") if pm.group(n) is not None)
    fsdp = pm.fsdp_mesh()
    fsdp_info = None if fsdp is None else dict(ranks=dist.get_process_group_ranks(fsdp.get_group()),
                                               own=fsdp.get_group() is not pm.sp_group)
    agree = agree_min(pm.branch_cpu_group)
    # Round r: only global rank r votes "cannot skip"; the others say "may skip".
    votes = [agree(ctx.rank != r) for r in range(ctx.world_size)]
    world_agree = agree_min(ctx.cpu_group)
    world_votes = [world_agree(ctx.rank != r) for r in range(ctx.world_size)]
    branch_sum = reduce_sum(pm.branch_group)(torch.tensor([float(ctx.rank), 1.0])).tolist()
    exchanged = None
    if cfg == 2:
        pred = torch.full((2, 3), float(ctx.rank)) + torch.arange(6.0).reshape(2, 3) / 10
        cond, uncond = exchange_predictions(pred, pm.cfg_group)
        exchanged = [cond[0, 0].item(), uncond[0, 0].item()]
    per_call_us = raw_us = None
    if calls:
        # Helper and bare collective in alternating blocks, so machine load hits both alike.
        raw = torch.ones(1, dtype=torch.int32)
        spent = {"agree": 0.0, "raw": 0.0}
        for _ in range(50):
            agree(True)
        dist.barrier()
        for _block in range(20):
            start = time.perf_counter()
            for i in range(calls // 20):
                agree(i % 7 != 0)
            spent["agree"] += time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(calls // 20):
                dist.all_reduce(raw, op=dist.ReduceOp.MIN, group=pm.branch_cpu_group)
            spent["raw"] += time.perf_counter() - start
        per_call_us, raw_us = (spent[k] / (calls // 20 * 20) * 1e6 for k in ("agree", "raw"))
    emit(dict(rank=ctx.rank, world=ctx.world_size, kind=ctx.env.kind,
              master=[ctx.env.master_addr, ctx.env.master_port],
              coords=dict(dp=pm.dp_rank, cfg=pm.cfg_rank, sp=pm.sp_rank), ranks=ranks, backends=backends,
              mesh_dims=mesh_dims, wraps=wraps, fsdp=fsdp_info, replica_rank=pm.replica_rank,
              branch=dist.get_process_group_ranks(pm.branch_cpu_group) if pm.branch_cpu_group else [ctx.rank],
              votes=votes, branch_sum=branch_sum, world_votes=world_votes, exchanged=exchanged, agree_us=per_call_us, raw_allreduce_us=raw_us))
