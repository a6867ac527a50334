"""A LoRA run on N ranks equals the LoRA run on one: Ulysses, FSDP (each rank merges its rows), CFG-parallel."""
from __future__ import annotations

import json

import pytest
from e2e_helpers import generate
from lora_helpers import make_lora
from safetensors.torch import load_file
from test_multirank import torchrun

from launcher.checkpoint import inspect_checkpoint
from launcher.wan.tasks import TASKS

pytestmark = pytest.mark.slow

TASK = "t2v-A14B"
#: Ulysses 2 with FSDP (covers the sequence split and row-wise merging at once) and CFG-parallel
LAYOUTS = {"u2-fsdp": ["--ulysses_size", "2", "--dit_fsdp"], "cfg": ["--cfg-parallel"]}


@pytest.fixture(scope="module")
def lora_runs(tiny_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("lora-mr")
    info = inspect_checkpoint(tiny_ckpt(TASK), TASKS[TASK])
    shapes = info.transformer_weights["high"].shapes
    style = make_lora(base / "style.safetensors", "peft-official", shapes, TASK, seed=5)
    delta = make_lora(base / "delta.safetensors", "diff", info.transformer_weights["low"].shapes, TASK, seed=6)
    flags = ["--lora", f"{style}:0.7", "--lora-low", str(delta)]
    return base, flags, generate(tiny_ckpt(TASK), base / "single", TASK, *flags)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_on_n_ranks_equals_one(tiny_ckpt, lora_runs, tmp_path, layout):
    _, flags, single = lora_runs
    video = tmp_path / "mr.mp4"
    args = ["generate", "--task", TASK, "--size", "64*64", "--frame_num", "5", "--ckpt_dir", str(tiny_ckpt(TASK)),
            "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7", "--sample_steps", "4",
            "--save_file", str(video), "--save-latents", str(tmp_path / "mr.safetensors"), *flags, *LAYOUTS[layout]]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(tmp_path / "mr.safetensors")["latents"], single["_latents"]
    assert (a - b).abs().max().item() < 1e-6
    manifest = json.loads(video.with_suffix(".json").read_text())
    assert manifest["world"]["size"] == 2
    assert [(r["sha256"], r["touched"]) for r in manifest["loras"]] == [(r["sha256"], r["touched"]) for r in single["loras"]]


def test_lightning_lora_pair_under_ulysses_fsdp_equals_one_rank(tiny_ckpt, lora_runs, tmp_path):
    """The 4-step recipe (euler, guidance 1: one forward per step) with a high/low LoRA pair on
    Ulysses 2 + FSDP gives the 1-rank latents (LightX2V #632: broken video under Ulysses)."""
    base, _, _ = lora_runs
    pair = ["--lora-high", f"{base / 'style.safetensors'}:0.9", "--lora-low", str(base / "delta.safetensors"),
            "--distilled", "lightning"]
    single = generate(tiny_ckpt(TASK), tmp_path / "single", TASK, *pair, steps=4)
    video = tmp_path / "mr.mp4"
    args = ["generate", "--task", TASK, "--size", "64*64", "--frame_num", "5", "--ckpt_dir", str(tiny_ckpt(TASK)),
            "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7", "--sample_steps", "4",
            "--save_file", str(video), "--save-latents", str(tmp_path / "mr.safetensors"), *pair,
            "--ulysses_size", "2", "--dit_fsdp"]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(tmp_path / "mr.safetensors")["latents"], single["_latents"]
    assert (a - b).abs().max().item() < 1e-6
    manifest = json.loads(video.with_suffix(".json").read_text())
    assert manifest["magcache"]["total_forwards"] == 4 and manifest["scheduler"]["solver"] == "euler"
