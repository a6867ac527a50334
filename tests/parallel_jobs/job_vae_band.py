"""Band-split VAE decode against the one-rank decode, both Wan VAEs, odd and uneven heights.

Every rank builds the same tiny random VAE (seeded) and draws the same latent; rank 0 also
decodes it whole. The bands are decoded over the world (fewer ranks when the latent has fewer
rows than ranks) and gathered to rank 0, which reports the max abs difference per case.
Args: latent heights, comma-separated (default 5,7).
"""
import sys

import torch
from diffusers import AutoencoderKLWan
from spawn import emit

from launcher.checkpoint.tiny import TINY_VAE, _randomize
from launcher.wan.vae import LATENT_STATS, decode
from launcher.wan.vae_parallel import decode_split, plan_decode
from parallel.dist import init_distributed
from parallel.launch import detect_launch

#: latent columns; wide enough that CPU convolutions pick the same kernel for a band as for the frame
WIDTH = 6


def tiny_vae(version: str) -> AutoencoderKLWan:
    mean, std = LATENT_STATS[version]
    vae = AutoencoderKLWan(**TINY_VAE[version], latents_mean=list(mean), latents_std=list(std))
    _randomize(vae, 0, f"vae-{version}")
    return vae.eval()


def main() -> None:
    heights = [int(h) for h in (sys.argv[1] if len(sys.argv) > 1 else "5,7").split(",")]
    torch.set_num_threads(1)
    with init_distributed(detect_launch(), device_preference="cpu", timeout=120) as ctx:
        report = {"rank": ctx.rank, "cases": []}
        for version in ("2.1", "2.2"):
            vae = tiny_vae(version)
            for h in heights:
                gen = torch.Generator().manual_seed(h)
                latent = torch.randn(vae.config.z_dim, 3, h, WIDTH, generator=gen)
                plan = plan_decode(h, ctx.world_size)
                video, ex = decode_split(vae, latent, plan, index=ctx.rank, group=None)
                case = {"version": version, "h": h, "parts": plan.split.parts, "fallback": plan.note,
                            "idle": ex is None, "halo_bytes": 0 if ex is None else sum(ex.sent_bytes.values())}
                if ctx.rank == 0:
                    ref = decode(vae, latent)
                    case.update(shape=list(video.shape), ref_shape=list(ref.shape),
                                max_err=(video - ref).abs().max().item(), bitwise=bool(torch.equal(video, ref)))
                else:
                    case.update(got_video=video is not None)
                report["cases"].append(case)
                for m in vae.modules():  # every patch was taken off again
                    assert "forward" not in vars(m), m
        emit(report)


if __name__ == "__main__":
    main()
