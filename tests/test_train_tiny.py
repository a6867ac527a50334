"""scripts/train_tiny.py runs every stage end to end (VAE, latents, text, DiT, the official layout,
`calibrate`) and writes a checkpoint folder the launcher loads, with its own ratio table. A few steps
of each stage only: the real run (~32 CPU-minutes) made models/tiny-shapes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env


@pytest.mark.slow
def test_a_few_steps_of_every_stage_write_a_checkpoint_with_its_ratio_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--out", str(out),
                           "--work", str(tmp_path / "work"), "--vae-steps", "3", "--vae-teach-steps", "1",
                           "--vae-full-steps", "1", "--vae-batch", "2", "--clips", "4", "--dit-steps", "2",
                           "--expert-steps", "1", "--dit-batch", "4"],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("high_noise_model/config.json", "low_noise_model/config.json", "Wan2.1_VAE.pth",
                 "models_t5_umt5-xxl-enc-bf16.pth", "training.json", "calibration_prompts.jsonl"):
        assert (out / name).is_file(), name
    training = json.loads((out / "training.json").read_text())
    assert (training["clips"], training["dit_steps"], training["expert_steps"], training["dit"]["num_layers"]) == (4, 2, 1, 4)
    table = json.loads((out / "magcache_ratios.json").read_text())
    assert (table["task"], table["sample_steps"]) == ("t2v-A14B", 40) and len(table["ratios"]) == 78
    assert len((out / "calibration_prompts.jsonl").read_text().splitlines()) == 8
