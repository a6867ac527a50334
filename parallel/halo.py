"""Row bands of an image-like tensor over a process group, and the halo rows a convolution needs.

A spatially split convolution gives the single-rank rows exactly when each rank sees, around its
own band, the `halo` rows its neighbours hold (zeros at the image's top and bottom edges, which
is what the convolution's zero padding would have added): no overlap, no blending. Everything
here is point-to-point (`batch_isend_irecv`), so ranks left out of a split (too few rows for
them) take part in nothing, and uneven bands need no padding: every rank computes the same
`BandSplit`, so it knows the shape of whatever it receives. Knows nothing of any model.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class BandSplit:
    """`rows` rows cut into contiguous bands, the first `rows % parts` bands one row taller."""

    sizes: tuple[int, ...]

    @classmethod
    def even(cls, rows: int, parts: int) -> BandSplit:
        if parts < 1 or rows < parts:
            raise ValueError(f"cannot cut {rows} rows into {parts} non-empty bands")
        base, extra = divmod(rows, parts)
        return cls(tuple(base + (i < extra) for i in range(parts)))

    @property
    def parts(self) -> int:
        return len(self.sizes)

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def start(self, i: int) -> int:
        return sum(self.sizes[:i])

    def scaled(self, factor: int) -> BandSplit:
        """The same bands after an exact `factor`x row upsampling (nearest: row r -> rows f*r..f*r+f-1)."""
        return BandSplit(tuple(s * factor for s in self.sizes))


def usable_parts(rows: int, ranks: int, min_rows: int) -> int:
    """The most ranks (<= `ranks`) that each get at least `min_rows` rows (a halo must fit in a band)."""
    return max(1, min(ranks, rows // max(1, min_rows)))


@dataclass
class RowExchange:
    """This rank's band of a split over the first `split.parts` ranks of `group` (None: one rank).

    Bands may grow by whole factors as the tensor flows through upsampling layers; every call
    infers the factor from its own band's height, so the same object serves every resolution.
    `sent_bytes` counts the halo bytes this rank sent, per caller-chosen label, and `row_elements`
    the elements of one row of each tensor exchanged (summed over calls): with `halo_bytes_per_exchange`
    they predict the bytes of any split, since a row's size does not depend on the band's height.
    """

    split: BandSplit
    index: int = 0
    group: dist.ProcessGroup | None = None
    sent_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    row_elements: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def parts(self) -> int:
        return self.split.parts

    def _peer(self, i: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, i) if self.group is not None else i

    def _split_at(self, x: torch.Tensor, dim: int) -> BandSplit:
        rows, own = x.shape[dim], self.split.sizes[self.index]
        if rows % own:
            raise ValueError(f"band of {rows} rows is not a whole multiple of this rank's {own} base rows")
        return self.split.scaled(rows // own)

    def _run(self, ops: list[tuple[str, torch.Tensor, int]]) -> None:
        """Post every send/recv at once (no ordering deadlock between neighbours), then wait."""
        if not ops:
            return
        import torch.distributed as dist

        p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, self._peer(peer), self.group)
               for kind, t, peer in ops]
        for work in dist.batch_isend_irecv(p2p):
            work.wait()

    def halo_padded(self, x: torch.Tensor, dim: int, halo: int, pad: list[int], label: str = "") -> torch.Tensor:
        """`F.pad(x, pad)` with `halo` rows of the neighbours (zeros at the image's edges) on both sides of `dim`.

        One allocation for the result (the neighbours' rows are received straight into it), where
        `halo` followed by `F.pad` would hold three copies of a large activation at once. `pad` is
        F.pad's list (last dim first) and must leave `dim` unpadded.
        """
        dim = dim % x.ndim
        pad = list(pad) + [0] * (2 * x.ndim - len(pad))
        j = 2 * (x.ndim - 1 - dim)
        if pad[j] or pad[j + 1]:
            raise ValueError("halo_padded pads the halo dim itself; leave it out of `pad`")
        pad[j] = pad[j + 1] = halo
        out = torch.nn.functional.pad(x, pad)  # zeros around x, x copied once
        self.row_elements[label] += x.numel() // x.shape[dim]
        if self.parts == 1 or halo == 0:
            return out
        if x.shape[dim] < halo:
            raise ValueError(f"a band of {x.shape[dim]} rows cannot give a halo of {halo} rows; use fewer ranks")
        inner = out
        for d in range(x.ndim):  # the view of `out` that holds x, minus the rows of `dim`
            if d != dim:
                before = pad[2 * (x.ndim - 1 - d)]
                inner = inner.narrow(d, before, x.shape[d])
        i, last = self.index, self.parts - 1
        ops: list[tuple[str, torch.Tensor, int]] = []
        recvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if i > 0:
            first = x.narrow(dim, 0, halo).contiguous()
            top = torch.empty_like(first)
            ops += [("send", first, i - 1), ("recv", top, i - 1)]
            recvs.append((inner.narrow(dim, 0, halo), top))
            self.sent_bytes[label] += first.numel() * first.element_size()
        if i < last:
            tail = x.narrow(dim, x.shape[dim] - halo, halo).contiguous()
            bottom = torch.empty_like(tail)
            ops += [("send", tail, i + 1), ("recv", bottom, i + 1)]
            recvs.append((inner.narrow(dim, inner.shape[dim] - halo, halo), bottom))
            self.sent_bytes[label] += tail.numel() * tail.element_size()
        self._run(ops)
        for view, rows in recvs:
            view.copy_(rows)
        return out

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every band of the split, concatenated along `dim`, on every rank of the split."""
        if self.parts == 1:
            return x
        dim = dim % x.ndim
        split = self._split_at(x, dim)
        mine = x.contiguous()
        parts: list[torch.Tensor] = []
        ops: list[tuple[str, torch.Tensor, int]] = []
        for j, rows in enumerate(split.sizes):
            if j == self.index:
                parts.append(mine)
                continue
            buf = _band_buffer(mine, dim, rows)
            parts.append(buf)
            ops += [("send", mine, j), ("recv", buf, j)]
        self._run(ops)
        return torch.cat(parts, dim=dim)

    def own_rows(self, full: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
        """This rank's band of a full-height tensor whose bands have `like`'s scale."""
        split = self._split_at(like, dim % like.ndim)
        return full.narrow(dim, split.start(self.index), split.sizes[self.index])

    def gather_to(self, x: torch.Tensor, dim: int, dst: int = 0) -> torch.Tensor | None:
        """Every band concatenated along `dim` on rank `dst` of the split; None elsewhere."""
        if self.parts == 1:
            return x
        dim = dim % x.ndim
        split = self._split_at(x, dim)
        mine = x.contiguous()
        if self.index != dst:
            self._run([("send", mine, dst)])
            return None
        parts = [mine if j == dst else _band_buffer(mine, dim, rows) for j, rows in enumerate(split.sizes)]
        self._run([("recv", p, j) for j, p in enumerate(parts) if j != dst])
        return torch.cat(parts, dim=dim)


def _band_buffer(like: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    shape = list(like.shape)
    shape[dim] = rows
    return like.new_empty(shape)


def _zero_pad(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    if before == 0 and after == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim) + [before, after]
    return torch.nn.functional.pad(x, pad)


def halo_bytes_per_exchange(parts: int, halo: int, row_elements: int, element_size: int) -> int:
    """Bytes all ranks send in one halo exchange: each of the parts-1 cuts carries `halo` rows both ways."""
    return 2 * (parts - 1) * halo * row_elements * element_size
