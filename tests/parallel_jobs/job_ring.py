"""Ring and ring x Ulysses attention against single-process SDPA, every (ring, ulysses) that fits.

Every rank draws the same full q, k, v (same seed), keeps its shard of the sequence group, runs
`usp_attention` and gathers; the result is compared with plain SDPA on the unpadded tensors.
Also reports the global ranks of this rank's ring and Ulysses groups (ring strided, Ulysses
consecutive).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn import emit

from parallel.dist import init_distributed
from parallel.launch import detect_launch
from parallel.mesh import ParallelDims
from parallel.ring import usp_attention
from parallel.ulysses import gather_sequence, split_sequence

B, H, D = 2, 8, 16
LENGTHS = (13, 16, 29)  # 16 divides every sequence group here; 13 and 29 need padding


def reference(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def members(group):
    return None if group is None else dist.get_process_group_ranks(group)


def main() -> None:
    with init_distributed(detect_launch(), device_preference="cpu", timeout=60) as ctx:
        report = {"rank": ctx.rank, "cases": [], "groups": {}}
        layouts = [(r, u) for r, u in ((2, 1), (4, 1), (2, 2)) if ctx.world_size % (r * u) == 0]
        for ring, uly in layouts:
            pm = ParallelDims.from_world(ctx.world_size, ulysses=uly, ring=ring).build(ctx)
            report["groups"][f"{ring}x{uly}"] = {"ring": members(pm.ring_group),
                                                 "ulysses": members(pm.ulysses_group), "sp": members(pm.sp_group)}
            for length in LENGTHS:
                gen = torch.Generator().manual_seed(length)
                q, k, v = (torch.randn(B, length, H, D, generator=gen) for _ in range(3))
                shards = [split_sequence(t, 1, pm.sp_group)[0] for t in (q, k, v)]
                out = usp_attention(*shards, pm.ulysses_group, pm.ring_group, valid_len=length)
                full = gather_sequence(out, 1, pm.sp_group, length)
                loose = usp_attention(*shards, pm.ulysses_group, pm.ring_group, valid_len=None)
                loose_full = gather_sequence(loose, 1, pm.sp_group, length)
                expected = reference(q, k, v)
                report["cases"].append({"ring": ring, "ulysses": uly, "length": length, "pad": -length % (ring * uly),
                                        "max_err": (full - expected).abs().max().item(),
                                        "unmasked_err": (loose_full - expected).abs().max().item()})
        emit(report)


if __name__ == "__main__":
    main()
