"""Helpers for end-to-end tests: run `generate` in-process and read back what it wrote."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from launcher.cli import main

SMALL = {"t2v-A14B": "64*64", "i2v-A14B": "64*64", "ti2v-5B": "64*64"}


def make_image(path: Path, size=(80, 56), seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def generate(ckpt: Path, out: Path, task: str, *extra: str, steps: int = 4, frames: int = 5) -> dict:
    video = out / "video.mp4"
    args = [
        "generate", "--task", task, "--size", SMALL[task], "--frame_num", str(frames), "--ckpt_dir", str(ckpt),
        "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7",
        "--sample_steps", str(steps), "--save_file", str(video), "--save-latents", str(out / "latents.safetensors"),
        "--overwrite", *extra,
    ]
    assert main(args) == 0
    manifest = json.loads(video.with_suffix(".json").read_text())
    manifest["_latents"] = load_file(out / "latents.safetensors")["latents"]
    return manifest
