"""Bad input: exit 2, one line on stderr naming the problem, no traceback, nothing written.

Each case runs the real console entry point in a subprocess, as a user would, except the errors found
after the checkpoint is read (`in_process`): those run the same `main` in this process, which has
torch and diffusers imported already (a subprocess pays ~6 s for that import per case).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli
from e2e_helpers import make_image


def assert_one_line_error(proc, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` as `launcher.cli.main(ARGS)` in this process, stdout/stderr captured at the
    file descriptors (what a terminal would show)."""
    from launcher.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def base(ckpt: Path | str, out: Path, task: str = "t2v-A14B", **over: str) -> list[str]:
    flags = {"--task": task, "--size": "64*64", "--frame_num": "5", "--ckpt_dir": str(ckpt), "--prompt": "a cat",
             "--sample_steps": "2", "--save_file": str(out / "v.mp4")}
    flags.update(over)
    args = ["generate"]
    for k, v in flags.items():
        if v is not None:
            args += [k, v]
    return args


FLAG_CASES = [
    ({"--task": "t2v-14B"}, ["--task", "unknown"]),
    ({"--size": "640x"}, ["--size", "WIDTH*HEIGHT"]),
    ({"--size": "72*64"}, ["multiples of 16"]),
    ({"--frame_num": "8"}, ["--frame_num 8", "4n+1"]),
    ({"--frame_num": "0"}, ["--frame_num 0"]),
    ({"--sample_steps": "0"}, ["--sample_steps 0"]),
    ({"--sample_solver": "heun"}, ["--sample_solver"]),
    ({"--magcache_thresh": "-0.1"}, ["--magcache_thresh"]),
    ({"--magcache_K": "0"}, ["--magcache_K"]),
    ({"--retention_ratio": "1.5"}, ["--retention_ratio"]),
    ({"--ckpt_dir": "/nonexistent/ckpt"}, ["--ckpt_dir", "not found"]),
    ({"--prompt": ""}, ["--prompt"]),
    ({"--sample_steps": "two"}, ["--sample"]),
    ({"--no-such-flag": "1"}, ["--no-such-flag"]),
    ({"--vae-parallel": "on"}, ["--vae-parallel 'on'", "auto or off"]),
]


@pytest.mark.parametrize("over,needles", FLAG_CASES, ids=[next(iter(o)) + "=" + str(next(iter(o.values()))) for o, _ in FLAG_CASES])
def test_bad_flags(tmp_path, over, needles):
    t0 = time.perf_counter()
    proc = run_cli(*base(tmp_path, tmp_path / "out", **over))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 60


def test_image_rules(tmp_path):
    img = make_image(tmp_path / "in.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert_one_line_error(run_cli(*base(tmp_path, out, task="i2v-A14B")), "needs --image")
    assert_one_line_error(run_cli(*base(tmp_path, out, task="i2v-A14B", **{"--image": str(tmp_path / "no.png")})),
                          "not found")
    assert_one_line_error(run_cli(*base(tmp_path, out, task="i2v-A14B", **{"--image": str(junk)})), "not a readable image")
    assert_one_line_error(run_cli(*base(tmp_path, out, **{"--image": str(img)})), "text-only")
    assert not out.exists()


def test_unwritable_output_and_existing_file(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            target = Path("/proc/self/v.mp4")
        else:
            target = ro / "v.mp4"
        assert_one_line_error(run_cli(*base(tmp_path, tmp_path, **{"--save_file": str(target)})), "not writable")
    finally:
        os.chmod(ro, 0o700)
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"keep me")
    assert_one_line_error(run_cli(*base(tmp_path, tmp_path, **{"--save_file": str(existing)})), "--overwrite")
    assert existing.read_bytes() == b"keep me"


def test_bad_ratio_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"task": "t2v-A14B", "sample_steps": 40, "sample_shift": 12.0, "ratios": [1.0, 0.9, 0.8]}))
    for path, needle in ((bad_json, "JSON"), (short, "ratios")):
        proc = run_cli("plan", "--task", "t2v-A14B", "--magcache_ratios", str(path))
        assert_one_line_error(proc, needle)
    assert_one_line_error(run_cli("plan", "--task", "t2v-A14B", "--magcache_ratios", str(tmp_path / "none.json")),
                          "not found")


def test_checkpoint_of_another_task(tiny_ckpt, tmp_path, capfd):
    out = tmp_path / "out"
    line = assert_one_line_error(in_process(capfd, *base(tiny_ckpt("i2v-A14B"), out, task="t2v-A14B")), "t2v-A14B")
    assert "i2v-A14B" in line
    assert_one_line_error(in_process(capfd, *base(tiny_ckpt("t2v-A14B"), out, task="ti2v-5B")), "ti2v-5B")
    assert not out.exists()


def test_ulysses_size_must_divide_heads(tiny_ckpt, tmp_path, capfd):
    proc = in_process(capfd, *base(tiny_ckpt("t2v-A14B"), tmp_path / "out", **{"--ulysses_size": "3"}))
    assert_one_line_error(proc, "--ulysses_size 3", "4 attention heads")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def _corrupt(kind: str, ckpt: Path) -> str:
    """Damage a copy of a tiny official checkpoint; return the file name the error must name."""
    import torch

    shard = sorted((ckpt / "low_noise_model").glob("diffusion_pytorch_model-0000*.safetensors"))[0]
    if kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-1000])
        return shard.name
    if kind == "shard missing from index":
        shard.unlink()
        return shard.name
    if kind == "wrong tensor shape":
        config = ckpt / "high_noise_model" / "config.json"
        data = json.loads(config.read_text())
        config.write_text(json.dumps({**data, "ffn_dim": data["ffn_dim"] * 2}))
        return "high_noise_model"
    if kind == "pickle that runs code":
        torch.save({"encoder.conv1.weight": torch.zeros(1), "evil": _RunsCode()}, ckpt / "Wan2.1_VAE.pth")
        return "Wan2.1_VAE.pth"
    if kind == "empty tokenizer folder":
        import shutil

        shutil.rmtree(ckpt / "google" / "umt5-xxl")
        (ckpt / "google" / "umt5-xxl").mkdir()
        return "umt5-xxl"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated shard", "shard missing from index", "wrong tensor shape",
                                  "pickle that runs code", "empty tokenizer folder"])
def test_corrupt_checkpoint_files(tiny_ckpt, tmp_path, kind, capfd):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt("t2v-A14B"), ckpt)
    name = _corrupt(kind, ckpt)
    out = tmp_path / "out"
    line = assert_one_line_error(in_process(capfd, *base(ckpt, out)), name)
    assert not out.exists(), line
    if kind == "pickle that runs code":
        assert "weights_only" in line
