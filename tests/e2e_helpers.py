"""Helpers for end-to-end tests: run `generate` in-process and read back what it wrote."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
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
    assert main(args) == 0  # at one thread, like the ranks it is compared with (conftest.one_thread)
    manifest = json.loads(video.with_suffix(".json").read_text())
    manifest["_latents"] = load_file(out / "latents.safetensors")["latents"]
    return manifest


#: the multi-node tests' generation (test_multinode.py, test_multinode_slurm.py): MagCache skips
#: forwards, so every rank must agree on each skip for the latents to equal one process's
MULTINODE_STEPS = 8
MULTINODE_MAGCACHE = ["--use_magcache", "--magcache_thresh", "0.5", "--retention_ratio", "0.2"]


@pytest.fixture(scope="module")
def single_process(tiny_ckpt, tmp_path_factory):
    """The multi-node tests' reference: their generation in this process (with its seconds)."""
    out = tmp_path_factory.mktemp("one-process-ref")
    t0 = time.monotonic()
    ref = generate(tiny_ckpt("t2v-A14B"), out, "t2v-A14B", *MULTINODE_MAGCACHE, steps=MULTINODE_STEPS)
    ref["_seconds"] = time.monotonic() - t0
    return ref
