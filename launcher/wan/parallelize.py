"""Make a Wan model set parallel in one step, before any weight is loaded.

The counterpart of torchtitan's `parallelize_<model>`: given the modules on meta and the mesh of
this rank, install the sequence-sharded attention (Ulysses, or ring x Ulysses, over the sp group), shard every DiT
and T5 block with FSDP2 over the sp group when asked, and pick how the two CFG branches meet
(serially on one rank, or one branch per config half). Loading then only loads: it reads the rows
a sharded parameter holds. `parallel/` supplies the collectives and knows nothing of Wan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from launcher.wan.dit import LocalSequence, SequenceSharding, WanDiT
from launcher.wan.pipeline import BranchExchange, SerialBranches

if TYPE_CHECKING:
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from launcher.wan.vae_parallel import SplitDecoder
    from parallel.mesh import ParallelMesh


class UlyssesSequence:
    """The sequence split over one branch's sp group, attention through Ulysses all-to-all."""

    def __init__(self, group: "dist.ProcessGroup", rank: int, size: int, kernel: str = "sdpa") -> None:
        self.group = group
        self.rank = rank
        self.size = size
        self.kernel = kernel

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        from parallel.ulysses import split_sequence

        return split_sequence(x, dim, self.group)[0]

    def gather(self, x: torch.Tensor, dim: int, valid_len: int) -> torch.Tensor:
        from parallel.ulysses import gather_sequence

        return gather_sequence(x, dim, self.group, valid_len)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        from parallel.ulysses import ulysses_attention

        return ulysses_attention(q, k, v, self.group, valid_len=valid_len, kernel=self.kernel)

    def local_valid(self, valid_len: int) -> int:
        chunk = -(-valid_len // self.size)
        return max(0, min(chunk, valid_len - self.rank * chunk))


class RingUlyssesSequence(UlyssesSequence):
    """The sequence split over ring x Ulysses ranks (ring outer); attention is USP: Ulysses
    all-to-all inside the Ulysses group, then the k/v ring over the ring group."""

    def __init__(self, group: "dist.ProcessGroup", rank: int, size: int, kernel: str = "sdpa", *,
                 ulysses_group: "dist.ProcessGroup | None", ring_group: "dist.ProcessGroup") -> None:
        super().__init__(group, rank, size, kernel)
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        from parallel.ring import usp_attention

        return usp_attention(q, k, v, self.ulysses_group, self.ring_group, valid_len=valid_len, kernel=self.kernel)


class CfgParallelBranches:
    """This rank computes one branch; the pair swaps predictions once per step."""

    def __init__(self, group: "dist.ProcessGroup", branch: int) -> None:
        self.group = group
        self.branches = (branch,)

    def combine(self, preds: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from parallel.cfg import exchange_predictions

        (local,) = preds.values()
        return exchange_predictions(local, self.group)


@dataclass(frozen=True, slots=True)
class ParallelWan:
    """The DiT experts wrapped for this rank's sharding, and what was decided for them."""

    experts: dict[str, WanDiT]
    sharding: SequenceSharding
    exchange: BranchExchange
    #: DiT / T5 blocks are FSDP2-sharded over the sp group (each rank loads its rows only)
    dit_sharded: bool
    t5_sharded: bool
    #: the VAE decode split by rows over this replica's ranks (`--vae-parallel auto` and more than one
    #: rank), else None: the output rank decodes alone
    split_decode: "SplitDecoder | None" = None


def parallelize_wan(experts: dict[str, "WanTransformer3DModel"], text_encoder: "UMT5EncoderModel",
                    mesh: "ParallelMesh | None", *, dit_fsdp: bool, t5_fsdp: bool,
                    dit_compute_dtype: torch.dtype | None = None, attention: str = "sdpa",
                    vae_parallel: bool = True) -> ParallelWan:
    """Shard the meta-built modules in place for this rank's mesh (None: one process, nothing to do).

    `dit_compute_dtype`: with FSDP, the dtype DiT blocks are all-gathered and computed in (official
    FSDP's `param_dtype`); None keeps the stored dtype (float32 runs).

    FSDP applies over the sp group only: with sp = 1 there is nothing to shard a block over, so the
    flags are accepted and the blocks stay whole (as official does with a single rank).
    `vae_parallel`: split the decode over the replica's ranks (each dp replica in its own group).
    """
    sharding: SequenceSharding = LocalSequence(attention)
    exchange: BranchExchange = SerialBranches()
    fsdp_mesh = None
    if mesh is not None and mesh.dims.sp > 1:
        if mesh.dims.ring > 1:
            sharding = RingUlyssesSequence(mesh.sp_group, mesh.sp_rank, mesh.dims.sp, attention,
                                           ulysses_group=mesh.ulysses_group, ring_group=mesh.ring_group)
        else:
            sharding = UlyssesSequence(mesh.sp_group, mesh.sp_rank, mesh.dims.sp, attention)
        if dit_fsdp or t5_fsdp:
            fsdp_mesh = mesh.fsdp_mesh()
    if mesh is not None and mesh.dims.cfg > 1:
        exchange = CfgParallelBranches(mesh.cfg_group, mesh.cfg_rank)
    shard_dit, shard_t5 = dit_fsdp and fsdp_mesh is not None, t5_fsdp and fsdp_mesh is not None
    stacks: dict[str, nn.Module | None] = {name: None for name in experts}
    if shard_dit or shard_t5:
        from parallel.fsdp import shard_modules, shard_stack

        if shard_dit:  # blocks sharded under one root that prefetches the next block's all-gather
            stacks = {name: shard_stack(model.blocks, fsdp_mesh, param_dtype=dit_compute_dtype)
                      for name, model in experts.items()}
        if shard_t5:
            shard_modules(text_encoder.encoder.block, fsdp_mesh)
    wrapped = {name: WanDiT(model, sharding, block_stack=stacks[name]) for name, model in experts.items()}
    split_decode = None
    if vae_parallel and mesh is not None and mesh.dims.cfg * mesh.dims.sp > 1:
        from launcher.wan.vae_parallel import SplitDecoder

        split_decode = SplitDecoder(group=mesh.replica_group, index=mesh.replica_rank,
                                    size=mesh.dims.cfg * mesh.dims.sp)
    return ParallelWan(experts=wrapped, sharding=sharding, exchange=exchange, dit_sharded=shard_dit,
                       t5_sharded=shard_t5, split_decode=split_decode)
