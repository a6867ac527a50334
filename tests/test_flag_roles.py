"""Each flag's role is declared once (launcher/options.py) and every list of flags is derived from it.

The batch resume check is the one that had drifted (a batch resumed with --ring_size 2 regenerated
its finished videos): here every placement and output flag is changed alone and a finished item
must still verify, and every flag that shapes the video is changed alone and it must not. The
alternative values are listed per flag, and the lists must name every flag of the role, so a new
flag cannot join a role untested. Real files, no generation (the torchrun resume is in test_batch.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.batch.items import FIELDS as LINE_FIELDS
from launcher.batch.results import resume_key, verified_manifest
from launcher.cli import SCHEDULE_FLAGS
from launcher.config import run_config_from_flags
from launcher.options import LINE, REQUEST_ONLY, Role, declarations, flag_defaults, flags_where
from launcher.outputs.atomic import manifest_path_for, sha256_of
from launcher.outputs.manifest import flags_of
from launcher.serve.requests import FIELDS as REQUEST_FIELDS

BASE = {"task": "i2v-A14B", "ckpt_dir": "/ckpt", "prompt": "a cat", "image": "a.png", "size": "64*64", "frame_num": 5,
        "sample_solver": "euler", "sample_steps": 4, "base_seed": 5}

#: placement and output flags: another value, same video
SAME_VIDEO = {
    "offload_model": "False", "t5_cpu": True, "t5_fsdp": True, "dit_fsdp": True, "ulysses_size": 2, "ring_size": 2,
    "cfg_parallel": True, "dist_timeout": 30.0, "compile": True, "vae_parallel": "off", "attention": "sdpa",
    "save_frames": "frames", "save_latents": "v.safetensors", "overwrite": True,
}
#: model, request, sampling and MagCache flags: another value, another video
OTHER_VIDEO = {
    "task": "ti2v-5B", "ckpt_dir": "/other", "convert_model_dtype": True, "dtype": "bfloat16", "device": "cuda",
    "quantize": "fp8", "quantize_steps": "2:-2", "quantize_blocks": "1:", "quantize_experts": "high",
    "lora": ["a.safetensors"], "lora_high": ["h.safetensors"], "lora_low": ["l.safetensors:0.5"],
    "prompt": "a dog", "image": "b.png",
    "size": "48*80", "frame_num": 9, "negative_prompt": "blurry", "base_seed": 6, "sample_solver": "unipc",
    "sample_steps": 5, "sample_shift": 3.0, "sample_guide_scale": "4,5", "timesteps": "1000,700,400,100",
    "distilled": "lightning",
    "use_magcache": True, "magcache_thresh": 0.1, "magcache_target_speedup": 1.5, "magcache_K": 4,
    "retention_ratio": 0.5, "magcache_split": "scheduler", "magcache_reset_at_switch": True,
    "magcache_ratios": "RATIOS",
}


def test_every_flag_of_a_run_has_a_role_and_the_value_lists_cover_each_role():
    roles = declarations()
    assert set(flag_defaults()) | set(flags_where(role=Role.CLUSTER)) == set(roles)
    # a Hub --ckpt_dir's revision and download resolve into the checkpoint folder before any run:
    # the folder (ckpt_dir, below) is what a run and its resume key see, never these two
    assert set(flags_where(role=Role.SOURCE)) == {"revision", "download"}
    assert not {"revision", "download"} & set(flags_of(run_config_from_flags(BASE, check_paths=False)))
    placed = set(flags_where(role=Role.PLACEMENT)) | set(flags_where(role=Role.OUTPUT)) - {"save_file"}
    assert set(SAME_VIDEO) == placed
    shaping = {f for f in roles if roles[f].role in (Role.MODEL, Role.REQUEST, Role.SAMPLING, Role.MAGCACHE)}
    assert set(OTHER_VIDEO) == shaping


@pytest.fixture()
def finished(tmp_path):
    """A finished item as a batch leaves it: a video and its manifest made from BASE."""
    config = run_config_from_flags(dict(BASE, save_file=tmp_path / "00000.mp4"), check_paths=False)
    video = tmp_path / "00000.mp4"
    video.write_bytes(b"the video")
    manifest = {"prompt": config.prompt, "seed": config.base_seed, "sha256": sha256_of(video), "flags": flags_of(config)}
    manifest_path_for(video).write_text(json.dumps(manifest))
    (tmp_path / "RATIOS").write_text("{}")
    return tmp_path


def _config(flags: dict, folder: Path):
    flags = {k: str(folder / v) if k == "magcache_ratios" else v for k, v in flags.items()}
    return run_config_from_flags(dict(flags, save_file=folder / "00000.mp4"), check_paths=False)


@pytest.mark.parametrize("flag", sorted(SAME_VIDEO))
def test_a_placement_or_output_change_keeps_a_finished_item(finished, flag):
    config = _config(dict(BASE, **{flag: SAME_VIDEO[flag]}), finished)
    assert flags_of(config) != flags_of(_config(BASE, finished))  # the flag did change the config
    assert verified_manifest(config, config.base_seed) is not None


@pytest.mark.parametrize("flag", sorted(OTHER_VIDEO))
def test_a_change_that_shapes_the_video_regenerates(finished, flag):
    flags = dict(BASE, **{flag: OTHER_VIDEO[flag]})
    if flag == "timesteps":
        flags["sample_steps"] = 4
    if flag == "magcache_target_speedup":
        flags.pop("magcache_thresh", None)
    config = _config(flags, finished)
    assert verified_manifest(config, config.base_seed) is None
    assert verified_manifest(_config(BASE, finished), 5) is not None  # the unchanged item still verifies


def test_the_resume_key_of_a_manifest_ignores_exactly_placement_output_and_the_seed(tmp_path):
    key = resume_key(flags_of(_config(BASE, tmp_path)))
    for field in ("ring_size", "ulysses_size", "compile", "dist_timeout_s", "save_file", "base_seed"):
        assert field not in key
    for field in ("task", "sample_steps", "magcache", "guide_scale", "loras", "width", "dtype", "device"):
        assert field in key


def test_derived_lists_follow_the_declarations():
    roles = declarations()
    assert SCHEDULE_FLAGS == {f for f, d in roles.items() if d.schedule}
    assert {"magcache_thresh", "sample_steps", "task", "image"} <= SCHEDULE_FLAGS
    assert not SCHEDULE_FLAGS & {"size", "frame_num", "ring_size", "save_file", "base_seed"}
    # a batch line: its name and the LINE flags (the seed by its line name)
    assert list(LINE_FIELDS) == ["name", "prompt", "image", "size", "frame_num", "negative_prompt", "seed"]
    # a serve request: the LINE and REQUEST_ONLY flags; a number is a float field's value too
    assert set(REQUEST_FIELDS) == {roles[f].field or f for f in flags_where(per_video=(LINE, REQUEST_ONLY))}
    assert REQUEST_FIELDS["magcache_thresh"] == (int, float) and REQUEST_FIELDS["use_magcache"] == (bool,)
    assert REQUEST_FIELDS["sample_guide_scale"] == (str, int, float)


def test_submit_offers_every_request_field():
    import typer.main

    from launcher.cli import app

    submit = typer.main.get_command(app).commands["submit"]  # type: ignore[attr-defined]
    options = {p.name: p.opts for p in submit.params}
    assert set(REQUEST_FIELDS) <= set(options)
    assert options["seed"][0] == "--seed" and "--no-magcache" in submit.params[
        [p.name for p in submit.params].index("use_magcache")].secondary_opts
