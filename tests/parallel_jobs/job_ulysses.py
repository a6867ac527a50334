"""Ulysses attention and sequence split/gather against single-process SDPA, every sp that fits.

Every rank draws the same full q, k, v (same seed), keeps its shard, runs the sharded
attention and gathers; the result is compared with plain SDPA on the unpadded full tensors.
Prints, per sp size and sequence length, the max abs error and whether split+gather round-trips.
"""
import torch
import torch.nn.functional as F

from parallel.dist import init_distributed
from parallel.launch import detect_launch
from parallel.mesh import ParallelDims
from parallel.ulysses import gather_sequence, split_sequence, ulysses_attention
from spawn import emit

B, H, D = 2, 8, 16
LENGTHS = (13, 16, 29)  # 16 divides every sp here; 13 and 29 need padding for sp 2 and 4


def reference(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def main() -> None:
    with init_distributed(detect_launch(), device_preference="cpu", timeout=60) as ctx:
        report = dict(rank=ctx.rank, cases=[])
        for sp in [d for d in (2, 4) if ctx.world_size % d == 0]:
            pm = ParallelDims.from_world(ctx.world_size, ulysses=sp).build(ctx)
            for length in LENGTHS:
                gen = torch.Generator().manual_seed(length)
                q, k, v = (torch.randn(B, length, H, D, generator=gen) for _ in range(3))
                shards = [split_sequence(t, 1, pm.sp_group) for t in (q, k, v)]
                pad = shards[0][1]
                out = ulysses_attention(*(s for s, _ in shards), pm.sp_group, valid_len=length)
                full = gather_sequence(out, 1, pm.sp_group, length)
                back = gather_sequence(shards[0][0], 1, pm.sp_group, length)
                # Control: the same run attending to the zero padding too must differ when padded.
                loose = ulysses_attention(*(s for s, _ in shards), pm.sp_group, valid_len=None)
                loose_full = gather_sequence(loose, 1, pm.sp_group, length)
                expected = reference(q, k, v)
                report["cases"].append(dict(sp=sp, length=length, pad=pad, local_len=shards[0][0].shape[1],
                                            max_err=(full - expected).abs().max().item(),
                                            unmasked_err=(loose_full - expected).abs().max().item(),
                                            roundtrip=bool(torch.equal(back, q)),
                                            shape=list(full.shape)))
        emit(report)


if __name__ == "__main__":
    main()
