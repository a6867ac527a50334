"""Guidance 1 runs the cond forward alone: `steps` forwards, not `2*steps`, and the same latents.

Official runs both branches and combines `uncond + 1*(cond - uncond)`, which is cond up to float
rounding; the two-branch run here is the real pipeline with the fast path off (`Request.cond_only`).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import run_cli

from launcher.checkpoint import inspect_checkpoint
from launcher.cli import main
from launcher.config import run_config_from_flags
from launcher.engine.session import GenerationSession
from launcher.engine.world import start_world
from magcache.controller import ComputeAll

STEPS = 4


@pytest.mark.slow
def test_guidance_one_runs_one_forward_per_step_and_matches_two_branches(tiny_ckpt):
    ckpt = tiny_ckpt("t2v-A14B")
    cfg = run_config_from_flags({"task": "t2v-A14B", "ckpt_dir": ckpt, "prompt": "a cat", "size": "64*64",
                                 "frame_num": 5, "sample_steps": STEPS, "sample_guide_scale": "1"},
                                check_paths=False)
    assert cfg.cond_only_experts == ("high", "low")
    info = inspect_checkpoint(ckpt, cfg.task)
    world = start_world(cfg, num_heads=info.num_heads)
    try:
        session = GenerationSession(cfg, info, world)
        request = session.request_for(cfg, 7)
        one, two = ComputeAll(), ComputeAll()
        fast = session.pipeline.generate(request, one)
        full = session.pipeline.generate(replace(request, cond_only=()), two)
    finally:
        world.shutdown()
    assert len(one.decisions) == STEPS and {d.branch for d in one.decisions} == {"cond"}
    assert len(two.decisions) == 2 * STEPS
    rel = ((fast.latents - full.latents).norm() / full.latents.norm()).item()
    assert rel < 1e-6, rel


@pytest.mark.slow
def test_plan_and_manifest_count_one_forward_per_guidance_one_step(tiny_ckpt, tmp_path):
    """Only the low-noise expert at guidance 1: its steps have no uncond forward, in plan and run alike."""
    mc = ["--use_magcache", "--magcache_thresh", "0.5", "--retention_ratio", "0.2"]
    flags = ["--task", "t2v-A14B", "--sample_steps", "10", "--sample_guide_scale", "1,4", *mc]
    proc = run_cli("plan", *flags, "--json")
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    two_branch = json.loads(run_cli("plan", "--task", "t2v-A14B", "--sample_steps", "10", *mc, "--json").stdout)
    low_steps = {f["step"] for f in planned["forwards"] if f["expert"] == "low"}
    assert planned["total_forwards"] == 20 - len(low_steps) and low_steps
    assert all(f["branch"] == "cond" for f in planned["forwards"] if f["expert"] == "low")
    # the cond forwards decide exactly as in the two-branch plan: per-branch state is untouched
    conds = [(f["index"], f["skip"]) for f in planned["forwards"] if f["branch"] == "cond"]
    assert conds == [(f["index"], f["skip"]) for f in two_branch["forwards"] if f["branch"] == "cond"]
    table = run_cli("plan", *flags)
    assert table.returncode == 0 and "(g=1)" in table.stdout

    video = tmp_path / "v.mp4"
    assert main(["generate", "--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--ckpt_dir",
                 str(tiny_ckpt("t2v-A14B")), "--prompt", "a cat", "--base_seed", "3", "--sample_steps", "10",
                 "--sample_guide_scale", "1,4", *mc, "--save_file", str(video)]) == 0
    ran = json.loads(video.with_suffix(".json").read_text())["magcache"]
    assert ran["total_forwards"] == planned["total_forwards"]
    assert [(d["index"], d["skip"]) for d in ran["decisions"]] == [(f["index"], f["skip"]) for f in planned["forwards"]]


def test_cfg_parallel_with_guidance_one_exits_2(tiny_ckpt, tmp_path, capsys):
    code = main(["generate", "--task", "ti2v-5B", "--ckpt_dir", str(tiny_ckpt("ti2v-5B")), "--prompt", "a cat",
                 "--sample_guide_scale", "1", "--cfg-parallel", "--ulysses_size", "2",
                 "--save_file", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--cfg-parallel with guidance scale 1" in err and "--ulysses_size 4" in err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("guide", ["1", "1,1"])
def test_ti2v_guidance_one_is_cond_only(guide, tiny_ckpt):
    cfg = run_config_from_flags({"task": "ti2v-5B", "ckpt_dir": tiny_ckpt("ti2v-5B"), "prompt": "a",
                                 "sample_guide_scale": guide}, check_paths=False)
    assert cfg.cond_only_experts == ("single",)
