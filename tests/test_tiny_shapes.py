"""The trained tiny-shapes model (models/tiny-shapes): its ratio table is the one runs use, it draws the
demo prompt recognisably, and the default MagCache setting keeps its video close to the uncached one (so
a change that breaks MagCache's quality fails here).

Measured when the floors were set (the demo's prompt and seed, 40 steps): PSNR cached-to-uncached 38.9 dB
(32 of 80 forwards skipped), frame-to-frame PSNR 23.5 dB; the detector reads red, down, blue off both
videos. Over 24 prompts/seeds the model gets colour and direction both right in 6 (colour alone in 20;
BENCHMARKS.md "tiny-shapes"); this prompt and seed are one it draws right, so a retrain or a
sampler change that loses the shape or its motion fails here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import shapes
from launcher.cli import main
from launcher.quality.frames import load_frames
from launcher.quality.metrics import compare_frames
from magcache.ratios import bundled_table

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "tiny-shapes"
PROMPT, SEED = "a red square moving down on a blue background", 40  # scripts/demo.sh's defaults
#: the default MagCache setting (thresh 0.04, K 2, retention 0.2) against uncached (measured 38.9 dB)
PSNR_FLOOR_DB = 33.0
#: mean PSNR between consecutive frames of the cached video (measured 23.5 dB)
FRAME_TO_FRAME_FLOOR_DB = 20.0


def plan_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["plan", "--task", "t2v-A14B", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_checkpoint_folders_ratio_table_drives_its_runs_unless_a_file_is_given(capsys, tmp_path):
    ckpt, other = tmp_path / "ckpt", tmp_path / "other.json"
    ckpt.mkdir()
    bundled = bundled_table("t2v-A14B")
    table = {"task": "t2v-A14B", "sample_steps": bundled.sample_steps, "sample_shift": bundled.sample_shift}
    (ckpt / "magcache_ratios.json").write_text(json.dumps({**table, "ratios": [1.0] * len(bundled.ratios)}))
    other.write_text(json.dumps({**table, "ratios": list(bundled.ratios)}))
    shipped = plan_json(capsys, "--ckpt_dir", str(ckpt))
    assert shipped["ratio_table"]["source"] == str(ckpt / "magcache_ratios.json")
    assert plan_json(capsys)["ratio_table"]["source"] == "bundled"  # no checkpoint folder: the published table
    given = plan_json(capsys, "--ckpt_dir", str(ckpt), "--magcache_ratios", str(other))
    assert given["ratio_table"]["source"] == str(other)
    assert given["skipped_forwards"] != shipped["skipped_forwards"]  # ratios of 1 skip far more


def test_detector_reads_the_data_set_it_was_made_for():
    for seed in range(24):
        scene, video = shapes.clip(seed)
        found = shapes.detect(video)
        assert (found.colour, found.direction, found.background) == (scene.colour, scene.direction, scene.background)
    still = shapes.render(shapes.Scene("circle", "red", "left", "black"), 32, 32, 8, speed=0.0)
    assert shapes.detect(still).direction is None


def _frames(tmp_path: Path, name: str, *extra: str) -> np.ndarray:
    out = tmp_path / name
    args = ["generate", "--task", "t2v-A14B", "--size", "64*64", "--frame_num", "9", "--ckpt_dir", str(CKPT),
            "--prompt", PROMPT, "--base_seed", str(SEED), "--save_file", str(out / "v.mp4"),
            "--save-frames", str(out / "frames"), "--overwrite", *extra]
    assert main(args) == 0
    return load_frames(out / "frames")


@pytest.mark.slow
def test_the_demo_video_is_recognisable_and_default_magcache_keeps_it(tmp_path):
    plain = _frames(tmp_path, "plain")
    cached = _frames(tmp_path, "cached", "--use_magcache")
    manifest = json.loads((tmp_path / "cached" / "v.json").read_text())
    assert manifest["magcache"]["ratio_table"]["source"].endswith("tiny-shapes/magcache_ratios.json")
    assert manifest["magcache"]["skipped_count"] > 0
    assert compare_frames(plain, cached).mean_psnr >= PSNR_FLOOR_DB
    v = cached.data.astype(np.float64)
    mse = ((v[1:] - v[:-1]) ** 2).mean(axis=(1, 2, 3))
    assert float(np.mean(10 * np.log10(255.0 ** 2 / mse))) >= FRAME_TO_FRAME_FLOOR_DB
    want = next(s for s in shapes.all_scenes() if s.prompt == PROMPT)
    for video in (plain, cached):
        found = shapes.detect(torch.from_numpy(video.data))
        assert (found.colour, found.direction, found.background) == (want.colour, want.direction, want.background)
