"""Ulysses sequence parallelism: shard the sequence, attend over all of it with a head slice.

Each rank holds S/N tokens with all H heads. One all-to-all (yunchang's SeqAllToAll4D) turns
that into all S tokens with H/N heads, attention runs locally, and a second all-to-all turns it
back. The sequence is padded to a multiple of N; padded keys are dropped before attention, so
the result equals the unpadded single-rank attention.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from yunchang.comm.all_to_all import SeqAllToAll4D

from parallel.attention import attend, check_self_attention
from parallel.mesh import check_heads

def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def split_sequence(x: Tensor, dim: int, group: dist.ProcessGroup | None,
                   pad_to_multiple: bool = True) -> tuple[Tensor, int]:
    """This rank's contiguous chunk of `x` along `dim`, and how many zero rows were appended.

    Padding goes at the end, so only the last ranks hold padding and `gather_sequence`
    drops it by length alone.
    """
    n = group_size(group)
    if n == 1:
        return x, 0
    length = x.shape[dim]
    pad = -length % n
    if pad and not pad_to_multiple:
        raise ValueError(f"sequence length {length} is not a multiple of the {n} sequence-parallel ranks; "
                         "pass pad_to_multiple=True or choose a size whose token count divides")
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    local = x.chunk(n, dim=dim)[dist.get_rank(group)]
    return local.contiguous(), pad


def gather_sequence(local: Tensor, dim: int, group: dist.ProcessGroup | None, valid_len: int) -> Tensor:
    """Inverse of `split_sequence`: all chunks in rank order, cut back to `valid_len`."""
    n = group_size(group)
    if n == 1:
        return local.narrow(dim, 0, valid_len) if local.shape[dim] != valid_len else local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local, group=group)
    full = torch.cat(parts, dim=dim)
    if not 0 <= valid_len <= full.shape[dim]:
        raise ValueError(f"valid_len {valid_len} is outside the gathered length {full.shape[dim]}")
    return full.narrow(dim, 0, valid_len)


def _pack_heads(x: Tensor, n: int) -> Tensor:
    """[B, s, 3, H, D] -> [B, s, 3H, D] ordered so each of the n head chunks holds its own q, k, v."""
    b, s, three, h, d = x.shape
    return x.reshape(b, s, three, n, h // n, d).transpose(2, 3).reshape(b, s, three * h, d)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, *,
                      valid_len: int | None, kernel: str = "sdpa") -> Tensor:
    """Self-attention over the whole (sharded) sequence; q, k, v, out are [B, S/N, H, D] local.

    q, k and v travel in one all-to-all (three times fewer messages than one each). `valid_len`
    is the unpadded global length: keys past it are padding from `split_sequence` and excluded.
    `kernel`: a name `parallel.attention.resolve` returned.
    """
    n = group_size(group)
    keep = check_self_attention(q, k, v, valid_len, q.shape[1] * n)
    check_heads(q.shape[2], n)
    if n == 1:
        return attend(q, k[:, :keep], v[:, :keep], kernel)
    qf, kf, vf = scatter_heads(q, k, v, group)                          # each [B, S, H/N, D]
    out = attend(qf, kf[:, :keep], vf[:, :keep], kernel)                # padded queries kept: shapes stay even
    return gather_heads(out, group)                                     # [B, S/N, H, D]


def scatter_heads(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, Tensor]:
    """First Ulysses all-to-all: [B, S/N, H, D] x3 -> [B, S, H/N, D] x3, q, k, v in one message.

    The S gathered rows are the N ranks' chunks in group-rank order (shared with ring x Ulysses).
    """
    n = group_size(group)
    b, s_local, h, d = q.shape
    packed = _pack_heads(torch.stack([q, k, v], dim=2), n)               # [B, S/N, 3H, D]
    full = SeqAllToAll4D.apply(group, packed, 2, 1)                     # [B, S, 3H/N, D]
    qf, kf, vf = full.reshape(b, s_local * n, 3, h // n, d).unbind(dim=2)
    return qf, kf, vf


def gather_heads(out: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Second Ulysses all-to-all: [B, S, H/N, D] -> [B, S/N, H, D]."""
    return SeqAllToAll4D.apply(group, out.contiguous(), 1, 2)
