"""CFG-parallel: the cond and uncond forwards of a step run on the two halves of the cfg dim.

Half 0 computes cond, half 1 uncond (`ParallelMesh.cfg_rank`); each rank of a half pairs with
the rank at the same (dp, sp) position of the other half, and the pair swaps predictions once
per step. Each half makes its own MagCache decisions in its own branch group; this exchange is
the only point where the halves meet.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

COND, UNCOND = 0, 1


def exchange_predictions(local_pred: Tensor, cfg_group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """(cond, uncond) on both ranks of the pair, from this rank's own branch prediction.

    One all_gather_into_tensor; the cfg group's rank order is the cfg coordinate (the mesh
    builds it that way), so slot 0 is cond.
    """
    if cfg_group is None or dist.get_world_size(cfg_group) != 2:
        size = None if cfg_group is None else dist.get_world_size(cfg_group)
        raise ValueError(f"exchange_predictions needs the 2-rank cfg group of a --cfg-parallel mesh, got size {size}; "
                         "without CFG-parallel run cond and uncond on this rank instead")
    flat = local_pred.contiguous().reshape(-1)
    both = flat.new_empty(2 * flat.numel())  # gloo gathers into a concatenation, not a stack
    _all_gather_flat(both, flat, group=cfg_group)
    both = both.view(2, *local_pred.shape)
    return both[COND], both[UNCOND]


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

