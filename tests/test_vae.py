"""VAE wrapper: official constants and normalisation, causal chunking, shapes and range."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.wan import vae as V
from launcher.checkpoint import inspect_checkpoint
from launcher.checkpoint.load import load_vae
from launcher.wan.tasks import TASKS

REF = Path(__file__).parent / "reference"
CASES = [("t2v-A14B", "2.1", 8), ("ti2v-5B", "2.2", 16)]  # (task, version, spatial stride)


@pytest.mark.parametrize("version, name", [("2.1", "official_wan21_vae.json"), ("2.2", "official_wan22_vae.json")])
def test_latent_constants_are_the_official_ones(version: str, name: str) -> None:
    ref = json.loads((REF / name).read_text())
    mean, std = V.LATENT_STATS[version]
    assert list(mean) == ref["latents_mean"]
    assert list(std) == ref["latents_std"]


@pytest.fixture(scope="module")
def vaes(tiny_ckpt):
    return {task: load_vae(inspect_checkpoint(tiny_ckpt(task), TASKS[task]), device="cpu")[0] for task, _, _ in CASES}


def _video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("task, version, stride", CASES)
def test_encode_decode_shapes_range_and_dtype(vaes, task: str, version: str, stride: int) -> None:
    vae = vaes[task]
    assert V.vae_version(vae) == version
    latent = V.encode(vae, _video(9, 2 * stride))
    assert latent.shape == (vae.config.z_dim, 3, 2, 2) and latent.dtype == torch.float32
    video = V.decode(vae, latent)
    assert video.shape == (3, 9, 2 * stride, 2 * stride) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0


@pytest.mark.parametrize("task, version, stride", CASES)
def test_normalisation_is_official(vaes, task: str, version: str, stride: int) -> None:
    vae = vaes[task]
    mean, std = (torch.tensor(s).view(-1, 1, 1, 1) for s in V.LATENT_STATS[version])
    x = _video(5, stride)
    mu = vae.encode(x[None]).latent_dist.mean[0]
    torch.testing.assert_close(V.encode(vae, x), (mu - mean) * (1.0 / std), rtol=0, atol=1e-6)
    z = torch.randn(vae.config.z_dim, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    raw = vae.decode((z * std + mean)[None]).sample[0].clamp(-1, 1)
    torch.testing.assert_close(V.decode(vae, z), raw, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task, version, stride", CASES)
def test_chunking_is_causal_like_official(vaes, task: str, version: str, stride: int) -> None:
    # official: frame 0 alone, then 4-frame chunks; decode one latent frame at a time -> earlier
    # frames never see later ones, so a prefix encodes/decodes the same as the whole clip's prefix.
    vae = vaes[task]
    x = _video(9, stride)
    whole = V.encode(vae, x)
    torch.testing.assert_close(V.encode(vae, x[:, :1]), whole[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(V.encode(vae, x[:, :5]), whole[:, :2], rtol=0, atol=1e-5)
    video = V.decode(vae, whole)
    torch.testing.assert_close(V.decode(vae, whole[:, :1]), video[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(V.decode(vae, whole[:, :2]), video[:, :5], rtol=0, atol=1e-5)


def test_bad_shapes_are_refused(vaes) -> None:
    vae = vaes["t2v-A14B"]
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        V.encode(vae, torch.zeros(1, 3, 5, 8, 8))
    with pytest.raises(ValueError, match=r"\[C, f, h, w\]"):
        V.decode(vae, torch.zeros(1, 16, 2, 1, 1))
