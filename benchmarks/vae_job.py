"""One rank of a `scripts/bench_vae.py` job: decode one latent whole (1 rank) or band-split (N ranks).

    torchrun --standalone --nproc-per-node N benchmarks/vae_job.py --version 2.1 --height 272 --width 480 \
        --frames 17 --out DIR [--reference DIR/ref.pt]

Builds the real-size Wan VAE decoder (Wan2.1: diffusers' defaults; Wan2.2: the official
`Wan2_2_VAE` sizes) with seeded random weights, the same on every rank, draws one seeded latent
and decodes it through the product's path (`launcher.wan.vae.decode` on one rank,
`launcher.wan.vae_parallel.decode_band` + `RowExchange.gather_to` on N). Writes `<out>/rank-<r>.json`:
decode seconds (band compute and float32 gather separately, plus a uint8 gather for comparison),
host peak RSS during the decode (VmHWM after resetting it via /proc/self/clear_refs) above the RSS
before it, halo bytes sent per layer, and the row elements each layer exchanged (for the formula).
One rank saves its video to `--save`; rank 0 of a split compares with `--reference`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from diffusers import AutoencoderKLWan

from launcher.checkpoint.tiny import _randomize
from launcher.wan.vae import LATENT_STATS, decode
from launcher.wan.vae_parallel import decode_band, plan_decode
from parallel.halo import RowExchange

#: real decoder sizes (official Wan2_1_VAE / Wan2_2_VAE); encoders are not built (decode only)
CONFIGS = {
    "2.1": {"base_dim": 96, "z_dim": 16},
    "2.2": {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
            "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16},
}
STRIDE = {"2.1": 8, "2.2": 16}


def build_vae(version: str) -> AutoencoderKLWan:
    mean, std = LATENT_STATS[version]
    with torch.device("meta"):
        vae = AutoencoderKLWan(**CONFIGS[version], latents_mean=list(mean), latents_std=list(std))
    vae.encoder = torch.nn.Identity()  # decode only: 54 M / 150 M parameters we never need
    vae = vae.to_empty(device="cpu")
    _randomize(vae, 0, f"vae-{version}")
    return vae.eval()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--version", choices=sorted(CONFIGS), required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reference", type=Path)
    p.add_argument("--save", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = None
    if world > 1:
        from parallel.dist import init_distributed
        from parallel.launch import detect_launch

        ctx = init_distributed(detect_launch(), device_preference="cpu", timeout=1800)
    rank = ctx.rank if ctx else 0
    vae = build_vae(args.version)
    s = STRIDE[args.version]
    lat_f, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // s, args.width // s
    latent = torch.randn(vae.config.z_dim, lat_f, lat_h, lat_w, generator=torch.Generator().manual_seed(1))
    plan = plan_decode(lat_h, world)
    ex = RowExchange(plan.split, index=rank, group=None)
    with torch.no_grad():
        # warm-up on a small latent through the same path: first-call allocations, gloo connections
        small = latent[:, :1, :2 * world, :4]
        if world == 1:
            decode(vae, small)
        else:
            warm = RowExchange(plan_decode(small.shape[2], world).split, index=rank)
            warm.gather_to(decode_band(vae, small, warm), dim=2)
        if ctx:
            import torch.distributed as dist

            dist.barrier()
        rss0 = _status_kib("VmRSS")
        _reset_peak()
        t0, cpu0 = time.perf_counter(), time.process_time()
        if world == 1:
            video = decode(vae, latent)
            t_band = time.perf_counter() - t0
            t_gather = t_gather_u8 = 0.0
        else:
            band = decode_band(vae, latent, ex)
            t_band = time.perf_counter() - t0
            t1 = time.perf_counter()
            video = ex.gather_to(band, dim=2)
            t_gather = time.perf_counter() - t1
        peak = _status_kib("VmHWM")
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if world > 1:  # the uint8 alternative: convert the band, gather 1/4 of the bytes
            t2 = time.perf_counter()
            ex.gather_to(((band + 1) / 2 * 255).round().to(torch.uint8), dim=2)
            t_gather_u8 = time.perf_counter() - t2
        rows = RowExchange(plan_decode(1, 1).split)  # one latent row: a row's size does not depend on the height
        if world == 1:
            decode_band(vae, latent[:, :, :1], rows)
    out = {"rank": rank, "world": world, "version": args.version, "latent_shape": list(latent.shape),
           "split": plan.describe(), "decode_s": total, "decode_cpu_s": cpu, "band_s": t_band, "gather_s": t_gather,
           "gather_uint8_s": t_gather_u8, "rss_before_mib": rss0 / 1024, "peak_rss_mib": peak / 1024,
           "decode_peak_above_before_mib": (peak - rss0) / 1024, "halo_bytes": dict(ex.sent_bytes),
           "row_elements": dict(rows.row_elements)}
    if video is not None:
        out["video_shape"] = list(video.shape)
        if args.save:
            torch.save(video, args.save)
        if args.reference:
            ref = torch.load(args.reference)
            out["max_abs_diff"] = (video - ref).abs().max().item()
            out["bitwise_equal"] = bool(torch.equal(video, ref))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(out))
    if ctx:
        ctx.shutdown()


if __name__ == "__main__":
    main()
