"""Decode one video with its latent rows split over the ranks of a generation, equal to one rank.

diffusers' `AutoencoderKLWan` stays the implementation: while `band_decoding` is active, a few of
its decoder modules get an instance-level `forward` that adds the rows their neighbours hold, and
the rest of the decoder runs unchanged on this rank's band. Why this is exact, layer by layer
(diffusers `autoencoder_kl_wan.py`, both the Wan2.1 and the Wan2.2 VAE):

- `WanCausalConv3d` (3x3x3 in the resnets, `conv_in`, `conv_out`): zero-pads 1 row above and
  below; here the band gets its neighbours' 1 boundary row instead (zeros only at the image's
  edges), over the cached frames and the new ones together, then the same `nn.Conv3d` runs with
  no row padding. 1x1x1 shortcuts and the (3,1,1) `time_conv` pad no rows: untouched.
- `WanResample` up (2d and 3d): `nearest-exact` x2 maps row r to rows 2r, 2r+1, so a band upsamples
  to exactly its rows of the upsampled image; its 3x3 `nn.Conv2d` gets a 1-row halo the same way.
- `WanAttentionBlock` (mid block, per-frame attention over the whole frame, at latent
  resolution): the bands are gathered, the block runs on the full frame, each rank keeps its rows.
- `WanRMS_norm` (over channels), SiLU, `DupUp3D` (2.2 shortcuts: row r -> rows 2r, 2r+1),
  `unpatchify` (2.2), the clamp: per pixel or per row block: local, no exchange.
- The temporal causal cache (`feat_cache`, last 2 frames per conv) holds this rank's band only.

No layer reduces over space except attention, so there is nothing else to all-reduce.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
)
from torch import nn

from parallel.halo import BandSplit, RowExchange, usable_parts

#: rows every band needs: the 3x3 convolutions at latent resolution take 1 row from each neighbour
MIN_LATENT_ROWS = 1


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How one decode is split: which ranks of the group take part and their latent rows."""

    ranks: int  # ranks in the generation's group
    split: BandSplit  # over the first split.parts of them
    note: str | None = None  # why fewer ranks than the group decode

    def describe(self) -> dict:
        out = {"ranks": self.split.parts, "of": self.ranks, "latent_rows": list(self.split.sizes)}
        if self.note:
            out["fallback"] = self.note
        return out


def plan_decode(latent_rows: int, ranks: int) -> DecodePlan:
    """Bands over as many ranks as can each hold a halo's worth of latent rows."""
    parts = usable_parts(latent_rows, ranks, MIN_LATENT_ROWS)
    note = None
    if parts < ranks:
        note = (f"{latent_rows} latent rows give at most {parts} bands of >= {MIN_LATENT_ROWS} row(s); "
                f"{ranks - parts} rank(s) idle during decode")
    return DecodePlan(ranks=ranks, split=BandSplit.even(latent_rows, parts), note=note)


def _conv3d_band(conv: WanCausalConv3d, ex: RowExchange, label: str):
    pw, ph, pt = conv._padding[0], conv._padding[2], conv._padding[4]

    def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        t_pad = pt
        if cache_x is not None and pt > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            t_pad -= cache_x.shape[2]
        x = ex.halo_padded(x, dim=3, halo=ph, pad=[pw, pw, 0, 0, t_pad, 0], label=label)
        return nn.Conv3d.forward(conv, x)

    return forward


def _conv2d_band(conv: nn.Conv2d, ex: RowExchange, label: str):
    ph, pw = conv.padding
    if conv.padding_mode != "zeros" or conv.stride[0] != 1:
        raise ValueError(f"{label}: only stride-1 zero-padded convolutions can be split by rows")

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = ex.halo_padded(x, dim=2, halo=ph, pad=[pw, pw], label=label)
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    return forward


def _attention_band(block: WanAttentionBlock, ex: RowExchange):
    def forward(x: torch.Tensor) -> torch.Tensor:
        full = ex.all_gather(x, dim=3)
        return ex.own_rows(WanAttentionBlock.forward(block, full), dim=3, like=x)

    return forward


def _band_forwards(vae: AutoencoderKLWan, ex: RowExchange) -> dict[nn.Module, object]:
    out: dict[nn.Module, object] = {}
    for name, m in vae.decoder.named_modules():
        if isinstance(m, WanCausalConv3d) and m._padding[2] > 0:
            out[m] = _conv3d_band(m, ex, name)
        elif isinstance(m, WanResample) and m.mode.startswith("upsample"):
            conv = m.resample[1]
            out[conv] = _conv2d_band(conv, ex, f"{name}.resample.1")
        elif isinstance(m, WanResample) and m.mode != "none":
            raise ValueError(f"{name}: a {m.mode} layer in the decoder cannot be split by rows")
        elif isinstance(m, WanAttentionBlock):
            out[m] = _attention_band(m, ex)
    return out


@contextlib.contextmanager
def band_decoding(vae: AutoencoderKLWan, ex: RowExchange) -> Iterator[None]:
    """While active, `vae.decode` on this rank's latent band returns this rank's rows of the video."""
    if vae.use_tiling:
        raise ValueError("tiled decoding blends overlapping tiles; band decoding needs it off")
    patched = _band_forwards(vae, ex)
    for m, fwd in patched.items():
        m.forward = fwd  # instance attribute: nn.Module.__call__ finds it before the class method
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def decode_band(vae: AutoencoderKLWan, latent: torch.Tensor, ex: RowExchange) -> torch.Tensor:
    """This rank's rows of `launcher.wan.vae.decode(vae, latent)`: [3, F, rows*stride, W] in [-1, 1]."""
    from launcher.wan.vae import decode

    start, rows = ex.split.start(ex.index), ex.split.sizes[ex.index]
    with band_decoding(vae, ex):
        return decode(vae, latent[:, :, start:start + rows])


def decode_split(vae: AutoencoderKLWan, latent: torch.Tensor, plan: DecodePlan, *, index: int,
                 group=None, dst: int = 0) -> tuple[torch.Tensor | None, RowExchange | None]:
    """Decode over the plan's ranks; the whole video on rank `dst` of the group, None elsewhere.

    Ranks of the group beyond the plan's bands take part in nothing and return (None, None).
    """
    if index >= plan.split.parts:
        return None, None
    ex = RowExchange(plan.split, index=index, group=group)
    band = decode_band(vae, latent, ex)
    return ex.gather_to(band, dim=2, dst=dst), ex


@dataclass
class SplitDecoder:
    """The band-split decode over one generation's ranks (`group`), as the pipeline calls it.

    Returns the video on rank 0 of the group (None elsewhere) and what the manifest records of
    this rank: its band, decode seconds, halo bytes sent and, on CUDA, the decode's peak memory.
    """

    group: object
    index: int
    size: int

    def __call__(self, vae: AutoencoderKLWan, latent: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        plan = plan_decode(latent.shape[2], self.size)
        device = latent.device
        stats: dict = {"index": self.index}
        if device.type == "cuda" and self.group is not None:
            # NCCL: a group's first point-to-point batch must include every rank of it, and idle ranks
            # of a fallback split send nothing; one tiny all-reduce brings the communicator up for all
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1, device=device), group=self.group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stats["cuda_peak_before_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        video, ex = decode_split(vae, latent, plan, index=self.index, group=self.group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stats["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        if ex is None:
            stats["latent_rows"] = 0
        else:
            stats["latent_rows"] = [plan.split.start(self.index), plan.split.start(self.index) + plan.split.sizes[self.index]]
            stats["halo_bytes_sent"] = sum(ex.sent_bytes.values())
        stats["host_rss_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return video, {"split": plan.describe(), "rank": stats}
