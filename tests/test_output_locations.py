"""Every output location is checked before a weight is loaded: exit 2, one line, nothing written.

On a real GPU run the old behaviour (fail after the whole denoise) cost the full generation time.
Each case runs the real CLI in a subprocess on a real tiny checkpoint, so "before loading" is
observable: the loading status line never appears (the error is the only stderr line).
Read-only directories are real read-only tmpfs mounts (root ignores permission bits).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from test_cli_errors import assert_one_line_error, base


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write in, root included: a tmpfs mounted read-only."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_save_file_under_proc_fails_before_loading(tiny_ckpt, tmp_path):
    proc = run_cli(*base(tiny_ckpt("t2v-A14B"), tmp_path, **{"--save_file": "/proc/nope/out.mp4"}))
    line = assert_one_line_error(proc, "--save_file /proc/nope/out.mp4", "not writable", "choose another path")
    assert "free space" not in line


@pytest.mark.parametrize("flag,name", [("--save-frames", "frames"), ("--save-latents", "lat.safetensors"),
                                       ("--save_file", "v.mp4")])
def test_read_only_output_directories_fail_before_loading(tiny_ckpt, tmp_path, read_only_dir, flag, name):
    over = {flag: str(read_only_dir / name)}
    if flag != "--save_file":
        over["--save_file"] = str(tmp_path / "v.mp4")
    assert_one_line_error(run_cli(*base(tiny_ckpt("t2v-A14B"), tmp_path, **over)), flag, str(read_only_dir),
                          "not writable")
    assert not (tmp_path / "v.mp4").exists() and files_under(read_only_dir) == []


def test_output_under_a_file_fails_before_loading(tiny_ckpt, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    for flag, target in (("--save-frames", a_file / "frames"), ("--save-latents", a_file / "x.safetensors"),
                         ("--save-frames", a_file)):
        proc = run_cli(*base(tiny_ckpt("t2v-A14B"), tmp_path / "o", **{flag: str(target)}))
        assert_one_line_error(proc, flag, "not a directory")
    assert a_file.read_text() == "keep" and not (tmp_path / "o").exists()


def test_missing_directories_that_can_be_created_are_created(tiny_ckpt, tmp_path):
    out = tmp_path / "new" / "deeper"
    proc = run_cli(*base(tiny_ckpt("t2v-A14B"), out, **{"--save-latents": str(out / "l" / "lat.safetensors"),
                                                        "--save-frames": str(out / "frames")}))
    assert proc.returncode == 0, proc.stderr
    assert (out / "v.mp4").is_file() and (out / "l" / "lat.safetensors").is_file()
    assert len(list((out / "frames").glob("frame_*.png"))) == 5
    assert not list(tmp_path.rglob(".magcache-launch-probe-*"))


def test_batch_out_dir_under_a_file_or_read_only_fails_before_loading(tiny_ckpt, tmp_path, read_only_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    a_file = tmp_path / "f"
    a_file.write_text("")
    common = ["--task", "t2v-A14B", "--ckpt_dir", str(tiny_ckpt("t2v-A14B")), "--size", "64*64",
              "--frame_num", "5", "--sample_steps", "2"]
    for out_dir, needle in ((a_file / "out", "not a directory"), (read_only_dir, "not writable")):
        proc = run_cli("batch", str(prompts), "--out-dir", str(out_dir), *common)
        assert_one_line_error(proc, "--out-dir", needle)


def test_calibrate_out_is_checked_before_loading(tiny_ckpt, tmp_path):
    proc = run_cli("calibrate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_ckpt("t2v-A14B")), "--prompt", "a cat",
                   "--size", "64*64", "--frame_num", "5", "--sample_steps", "2", "--out", "/proc/nope/r.json")
    assert_one_line_error(proc, "--out /proc/nope/r.json", "not writable")


def test_default_output_folder_is_checked(tiny_ckpt, tmp_path, read_only_dir):
    args = [a for a in base(tiny_ckpt("t2v-A14B"), tmp_path) if True]
    i = args.index("--save_file")
    del args[i:i + 2]
    proc = run_cli(*args, cwd=read_only_dir)
    assert_one_line_error(proc, "working directory", "not writable")
    assert json.dumps(files_under(read_only_dir)) == "[]"
