"""Ring attention, and ring x Ulysses (USP): exact self-attention when the sequence outgrows Ulysses.

Ulysses caps the sequence degree at a divisor of the head count and puts each all-to-all on the
slowest link of the group. Ring attention has no such cap and talks only to two neighbours: each
rank keeps its query block while the key/value blocks travel once around the ring group; every
arriving block is attended to, and the partial results are merged with their log-sum-exp (the
softmax over all keys is the LSE-weighted sum of the softmaxes over the blocks), so the result is
the full attention, not an approximation.

Why point-to-point and not an all-gather of k, v: an all-gather holds all S keys on every rank
(the memory ring attention exists to avoid) and cannot overlap; the ring holds two blocks and
sends the next while the current one is attended to. Why our own ring rather than yunchang's
(0.6.4, `yunchang.ring.ring_pytorch_attn_func`, the CPU-capable one): it takes no key mask or
valid length, so the padding `split_sequence` appends would be attended to; it is an autograd
Function that clones k and v for a backward inference never runs; it sends k and v as two
messages. The loop below is the same algorithm with those three changed.

Padding: `split_sequence` pads the end of the sequence. Padded keys are never attended to: each
block is cut to its valid keys (a block of padding alone is skipped), so the result equals the
unpadded single rank. Padded queries are computed and later dropped by `gather_sequence`.

USP composition (`usp_attention`): the sequence group is ring x Ulysses with Ulysses inner (the
ranks of one Ulysses group are neighbours in a node) and ring outer (its ranks are a node apart).
The Ulysses all-to-all first turns [B, S/(R*U), H, D] into [B, S/R, H/U, D], the contiguous block
of ring index r; the ring then runs over the ring group with H/U heads; the second all-to-all
restores the sequence shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.attention import attend, attend_with_lse, check_self_attention
from parallel.mesh import check_heads
from parallel.ulysses import gather_heads, group_size, scatter_heads


def merge_partial(acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Combine two attentions over disjoint key sets: (out [B, Sq, h, D] float32, lse [B, h, Sq])."""
    out, lse = part
    out = out.float()
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    w_acc = torch.exp(acc_lse - new_lse).transpose(1, 2).unsqueeze(-1)     # [B, Sq, h, 1]
    w_new = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)
    return acc_out * w_acc + out * w_new, new_lse


def block_valid(block: int, block_len: int, valid_len: int) -> int:
    """How many of block `block`'s keys (positions block*block_len ...) lie before `valid_len`."""
    return max(0, min(block_len, valid_len - block * block_len))


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, *,
                   valid_len: int | None, kernel: str = "sdpa") -> Tensor:
    """Self-attention over the ring group's whole sequence; q, k, v, out are this rank's block [B, S/R, h, D].

    Block r holds positions r*S/R ... (r+1)*S/R - 1; `valid_len` is the unpadded global length.
    Per call each rank sends R-1 k/v blocks to its next neighbour and receives R-1 from the
    previous one (2 * (R-1) * B * S/R * h * D elements). Every block is attended to with `kernel`
    (a name `parallel.attention.resolve` returned), whose LSE merges the blocks.
    """
    n = group_size(group)
    s_blk = q.shape[1]
    keep = check_self_attention(q, k, v, valid_len, s_blk * n)
    if n == 1:
        return attend(q, k[:, :keep], v[:, :keep], kernel)
    me = dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (me + 1) % n), dist.get_global_rank(group, (me - 1) % n)
    kv = torch.stack([k, v]).contiguous()                                   # one message per hop
    acc: tuple[Tensor, Tensor] | None = None
    for step in range(n):
        reqs = []
        if step < n - 1:  # pass the block on while attending to it
            incoming = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                           dist.P2POp(dist.irecv, incoming, prv, group)])
        valid = block_valid((me - step) % n, s_blk, keep)
        if valid:
            acc = merge_partial(acc, attend_with_lse(q, kv[0, :, :valid], kv[1, :, :valid], kernel))
        for req in reqs:
            req.wait()
        if reqs:
            kv = incoming
    assert acc is not None  # keep >= 1: block 0 always holds a valid key
    return acc[0].to(q.dtype)


def usp_attention(q: Tensor, k: Tensor, v: Tensor, ulysses_group: dist.ProcessGroup | None,
                  ring_group: dist.ProcessGroup | None, *, valid_len: int | None,
                  kernel: str = "sdpa") -> Tensor:
    """Ring x Ulysses self-attention; q, k, v, out are [B, S/(R*U), H, D] local (R*U ranks, ring outer).

    This rank's shard index in the sequence group must be ring_rank * U + ulysses_rank, which is
    the order `parallel.mesh.ParallelMesh` builds the two groups in.
    """
    u = group_size(ulysses_group)
    check_heads(q.shape[2], u)
    if u > 1:
        q, k, v = scatter_heads(q, k, v, ulysses_group)                     # [B, S/R, H/U, D]
    out = ring_attention(q, k, v, ring_group, valid_len=valid_len, kernel=kernel)
    return gather_heads(out, ulysses_group) if u > 1 else out
