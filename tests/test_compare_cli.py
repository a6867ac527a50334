"""`magcache-launch compare A B` end to end: the real console entry point in a subprocess, on files
written by the same functions `generate` writes with (mp4, --save-frames PNGs, --save-latents)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_cli_errors import assert_one_line_error
from test_quality_metrics import write_random_lpips_weights

from launcher.outputs.media import write_frames, write_latents, write_mp4


def _video(frames: int, h: int, w: int, seed: int) -> torch.Tensor:
    """[3,F,H,W] in [-1,1], smooth enough that H.264 keeps it recognisable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, frames, h // 8, w // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("compare")
    ref = _video(5, 48, 64, seed=0)
    g = torch.Generator().manual_seed(1)
    noisy = (ref + 0.04 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    paths = {"a": d / "a.mp4", "b": d / "b.mp4", "small": d / "small.mp4", "frames": d / "frames",
             "la": d / "a.safetensors", "lb": d / "b.safetensors"}
    write_mp4(paths["a"], ref, fps=16)
    write_mp4(paths["b"], noisy, fps=16)
    write_mp4(paths["small"], _video(9, 32, 48, seed=2), fps=16)
    write_frames(paths["frames"], noisy)
    lat = torch.randn(16, 2, 6, 8, generator=g)
    write_latents(paths["la"], lat)
    write_latents(paths["lb"], lat + 0.1 * torch.randn(lat.shape, generator=g))
    return paths


def test_table_and_plot(media, tmp_path):
    plot = tmp_path / "plots" / "per_frame.png"
    proc = run_cli("compare", str(media["a"]), str(media["b"]), "--plot", str(plot), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "SSIM luma*" in out and "PSNR dB" in out and "flicker" in out and "mean" in out
    assert sum(1 for ln in out.splitlines() if ln.strip().startswith(("│     ", "┃"))) >= 5  # one row per frame
    assert "headline: SSIM (luma, BT.601) 0." in out
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("LPIPS skipped: pass --lpips-weights DIR")
    assert "alexnet-owt-7be5be79.pth" in err[0] and "alex.pth" in err[0] and "lpips" in err[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_png_folder_and_lpips(media, tmp_path):
    weights = write_random_lpips_weights(tmp_path / "w")
    proc = run_cli("compare", str(media["b"]), str(media["frames"]), "--json", "--lpips-weights", str(weights),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    j = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert j["kind"] == "pixels" and j["shape"] == [5, 48, 64, 3] and j["frames"] == 5
    assert j["headline"]["metric"] == "ssim_luma" and 0.5 < j["headline"]["value"] < 1
    assert j["identical"] is False  # the mp4 went through H.264; the PNGs are lossless
    assert len(j["per_frame"]["lpips"]) == 5 and j["mean"]["lpips"] > 0
    assert j["per_frame"]["flicker"][0] is None and "LPIPS skipped" not in proc.stderr


def test_latents_json(media):
    proc = run_cli("compare", str(media["la"]), str(media["lb"]), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    j = json.loads(proc.stdout)
    assert j["kind"] == "latents" and j["shape"] == [2, 16, 6, 8] and j["headline"]["metric"] == "psnr"
    assert 0.9 < j["mean"]["cosine"] < 1 and "LPIPS" not in proc.stderr


def test_bad_input_is_one_line_exit_2(media, tmp_path):
    """Two cases only: each exit-2 path costs a torch import (the CLI's error mapping loads
    parallel.mesh); the other one-line errors are unit tests in test_quality_metrics.py."""
    proc = run_cli("compare", str(media["a"]), str(media["small"]), timeout=120)
    assert_one_line_error(proc, "A has 5 frames of 64x48, B has 9 frames of 48x32", "one shape")
    assert proc.stdout == ""
    proc = run_cli("compare", str(media["a"]), str(tmp_path / "missing.mp4"), timeout=120)
    assert_one_line_error(proc, "missing.mp4", "not found")


def test_partly_different_frames_say_not_identical(tmp_path):
    """The real case: PNG folders equal but for one pixel of one frame (mean PSNR inf, SSIM 1.0000)."""
    from PIL import Image

    a, b = tmp_path / "a", tmp_path / "b"
    write_frames(a, _video(4, 32, 32, seed=3))
    write_frames(b, _video(4, 32, 32, seed=3))
    frame = b / "frame_00002.png"
    px = Image.open(frame).convert("RGB")
    r, g, bl = px.getpixel((5, 5))
    px.putpixel((5, 5), ((r + 1) % 256, g, bl))
    px.save(frame)
    proc = run_cli("compare", str(a), str(b), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SSIM (luma, BT.601) 1.0000" in proc.stdout and "PSNR inf dB" in proc.stdout
    assert "B is NOT identical to A: 1 of 4 frames differ (PSNR " in proc.stdout
    assert "the other 3 are identical (PSNR inf), so the mean PSNR is inf" in proc.stdout
