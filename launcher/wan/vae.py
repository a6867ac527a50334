"""Wan VAE encode/decode with the official latent normalisation (docs/pipeline_facts.md #20, #21).

`diffusers.AutoencoderKLWan` already does the official causal chunking: `_encode` runs frame 0
alone then 4-frame chunks through one feature cache, `_decode` runs one latent frame at a time
(`first_chunk=True` for frame 0, which the 2.2 up blocks use), patchifies 2x2 for the 2.2 VAE
and clamps the output to [-1, 1]. Differences from the official `WanVAE_`, none affecting the
result: diffusers' optional tiling/slicing (off by default, we never turn them on) and it
returns `DiagonalGaussianDistribution(h)` where official returns `(mu, log_var)`; we take `.mode()`
= mu. Mean/std are applied here, as official does, not via `vae.config.latents_mean`.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

#: `Wan2_1_VAE.__init__` mean/std (z 16), verbatim from tests/reference/official_wan21_vae.json.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
#: `Wan2_2_VAE.__init__` mean/std (z 48), verbatim from tests/reference/official_wan22_vae.json.
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

LATENT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "2.1": (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
    "2.2": (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD),
}


def vae_version(vae: AutoencoderKLWan) -> str:
    """'2.1' (z 16) or '2.2' (z 48): the latent width decides which official constants apply."""
    z = vae.config.z_dim
    for version, (mean, _) in LATENT_STATS.items():
        if len(mean) == z:
            return version
    raise ValueError(f"VAE has z_dim {z}; only the Wan2.1 (16) and Wan2.2 (48) VAEs are supported")


def _scale(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """Official `scale = [mean, 1/std]` as float32 tensors shaped to broadcast over [C, f, h, w]."""
    mean, std = LATENT_STATS[vae_version(vae)]
    device = vae.post_quant_conv.weight.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    return mean_t, inv_std


@torch.no_grad()
def encode(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """video [3, F, H, W] in [-1, 1] -> normalised latent [C, (F-1)//4+1, H/s, W/s] (mu, no sampling)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"encode expects a video [3, F, H, W]; got shape {tuple(video.shape)}")
    mean, inv_std = _scale(vae)
    x = video.to(device=mean.device, dtype=torch.float32)[None]
    mu = vae.encode(x).latent_dist.mode()[0].float()
    return (mu - mean) * inv_std


@torch.no_grad()
def decode(vae: AutoencoderKLWan, latent: torch.Tensor) -> torch.Tensor:
    """normalised latent [C, f, h, w] -> video [3, 4(f-1)+1, H, W] in [-1, 1], float32."""
    if latent.ndim != 4:
        raise ValueError(f"decode expects a latent [C, f, h, w]; got shape {tuple(latent.shape)}")
    mean, inv_std = _scale(vae)
    z = latent.to(device=mean.device, dtype=torch.float32) / inv_std + mean
    return vae.decode(z[None]).sample[0].float().clamp_(-1.0, 1.0)
