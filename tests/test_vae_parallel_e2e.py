"""`--vae-parallel` end to end: real torchrun generate jobs on CPU/gloo, frames against one-rank decode.

Each job saves its final latents and lossless PNG frames; the test decodes those latents in this
process with the one-rank `launcher.wan.vae.decode` and compares. `auto` (the split) equals it to
float32 rounding, so a rounded 8-bit pixel may move by one level at most; `off` (the output rank
decodes alone, as before the split existed) equals it bit for bit. A rank killed while the video
is being decoded ends the job with the one-line message and writes nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli_env
from PIL import Image
from safetensors.torch import load_file
from test_reliability_multirank import (
    LOST,
    TorchrunJob,
    assert_clean_logs,
    assert_nothing_written,
    error_lines,
    summary_exit_codes,
    wait_for,
)

from launcher.checkpoint import inspect_checkpoint
from launcher.checkpoint.load import load_vae
from launcher.outputs.media import frames_uint8_rounded
from launcher.wan.tasks import TASKS
from launcher.wan.vae import decode

pytestmark = pytest.mark.slow

LAYOUTS = {"cfg": ["--cfg-parallel"], "u4": ["--ulysses_size", "4"], "cfg-u2": ["--cfg-parallel", "--ulysses_size", "2"]}


def run_generate(ckpt: Path, out: Path, task: str, nproc: int, size: str, *flags: str) -> dict:
    args = ["generate", "--task", task, "--size", size, "--frame_num", "5", "--ckpt_dir", str(ckpt),
            "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7", "--sample_steps", "2",
            "--save_file", str(out / "v.mp4"), "--save-frames", str(out / "frames"),
            "--save-latents", str(out / "v.safetensors"), "--dist-timeout", "120", *flags]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "launcher", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=420, check=False)
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "v.json").read_text())
    manifest["_stderr"] = proc.stderr
    return manifest


def one_rank_frames(ckpt: Path, task: str, latents_file: Path) -> np.ndarray:
    vae = load_vae(inspect_checkpoint(ckpt, TASKS[task]), device="cpu")[0]
    return frames_uint8_rounded(decode(vae, load_file(latents_file)["latents"]))


def png_frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


@pytest.mark.parametrize("task, layout, nproc, size, bands", [
    ("t2v-A14B", "cfg", 2, "64*48", [3, 3]),
    ("t2v-A14B", "u4", 4, "64*48", [2, 2, 1, 1]),      # uneven bands
    ("ti2v-5B", "cfg-u2", 4, "96*32", [1, 1]),          # 2 latent rows for 4 ranks: falls back to 2
], ids=["t2v-cfg2", "t2v-u4-uneven", "ti2v-cfg-u2-fallback"])
def test_split_decode_frames_equal_one_rank(tiny_ckpt, tmp_path, task, layout, nproc, size, bands):
    ckpt = tiny_ckpt(task)
    m = run_generate(ckpt, tmp_path, task, nproc, size, *LAYOUTS[layout])
    vd = m["vae_decode"]
    assert vd["parallel"] and vd["of"] == nproc and vd["latent_rows"] == bands, vd
    assert ("fallback" in vd) == (len(bands) < nproc)
    assert [r["rank"] for r in vd["per_rank"]] == list(range(nproc))
    for r in vd["per_rank"]:
        active = r["index"] < len(bands)
        assert r["host_rss_peak_mb"] > 0 and (r["seconds"] > 0 or not active)
        assert (r["latent_rows"] == 0) == (not active)
    assert m["flags"]["vae_parallel"] == "auto"
    assert f"decoding on {nproc} ranks" in m["_stderr"]
    mine, ref = png_frames(tmp_path / "frames"), one_rank_frames(ckpt, task, tmp_path / "v.safetensors")
    assert mine.shape == ref.shape
    diff = np.abs(mine.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_off_decodes_on_the_output_rank_bit_for_bit(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("t2v-A14B")
    m = run_generate(ckpt, tmp_path, "t2v-A14B", 2, "64*48", "--cfg-parallel", "--vae-parallel", "off")
    assert m["vae_decode"] == {"parallel": False, "ranks": 1}
    assert np.array_equal(png_frames(tmp_path / "frames"), one_rank_frames(ckpt, "t2v-A14B", tmp_path / "v.safetensors"))


def test_rank_killed_during_split_decode_ends_the_job_and_writes_nothing(tiny_ckpt, tmp_path):
    """21 frames at 128*64: the tiny VAE decodes for seconds, long enough to kill a rank inside it."""
    out = tmp_path / "out"
    args = ["generate", "--task", "t2v-A14B", "--size", "128*64", "--frame_num", "21", "--ckpt_dir",
            str(tiny_ckpt("t2v-A14B")), "--prompt", "a cat", "--base_seed", "3", "--sample_steps", "2",
            "--cfg-parallel", "--save_file", str(out / "v.mp4"), "--save-latents", str(out / "v.safetensors"),
            "--dist-timeout", "60"]
    # torchrun looks only every 30 s: rank 0 must notice the dead peer at its next halo exchange by itself
    job = TorchrunJob(tmp_path, 2, args, monitor_interval=30)
    try:
        ranks = job.wait_denoising()
        wait_for(lambda: "decoding on 2 ranks" in job.rank_log(0), 240, "rank 0 to start decoding", poll=0.05)
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        times = job.exit_times(t0)
        code = job.finish()
    finally:
        job.kill()
    assert "video " not in job.rank_log(0), "the decode had finished before the kill; make it longer"
    print(f"rank 1 SIGKILLed while decoding: rank 0 gone after {times[0]:.2f} s")
    assert code == 1
    codes, _ = summary_exit_codes(job.output())
    assert codes[1] == -9 and codes[0] == 1, codes
    lines = error_lines(job.rank_log(0))
    assert len(lines) == 1 and LOST.match(lines[0]), lines
    assert_clean_logs(job)
    assert_nothing_written(out)
