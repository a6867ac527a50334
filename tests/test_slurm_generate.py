"""The real CLI under real Slurm: both sbatch templates generate a video equal to one process.

scripts/slurm/generate.sbatch (srun, one task per rank) and generate-torchrun.sbatch (one
torchrun per node) each run `magcache-launch generate --ulysses_size 2 --use_magcache` on 2 CPU
ranks of the local cluster. The video must have the right frames and fps, the manifest the Slurm
or torchrun world, and the final latents must equal a single-process run (relative L2 < 1e-5)
with the same skipped forwards. MAGCACHE_LAUNCH_CMD is unset: the templates run the installed
`magcache-launch` from the venv they find.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from safetensors.torch import load_file
from slurm_helpers import REPO, slurm_cluster, submit_and_wait  # noqa: F401 (fixture)

from launcher.outputs.media import read_mp4_info

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TASK, STEPS, FRAMES, FPS = "t2v-A14B", 8, 5, 16
MAGCACHE = ["--use_magcache", "--magcache_thresh", "0.5", "--retention_ratio", "0.2"]
TEMPLATES = {
    "srun": (REPO / "scripts" / "slurm" / "generate.sbatch", ["--ntasks-per-node=2"], "slurm"),
    "torchrun": (REPO / "scripts" / "slurm" / "generate-torchrun.sbatch", ["--cpus-per-task=2"], "torchrun"),
}


def generate_args(ckpt: Path, out: Path) -> list[str]:
    return ["--task", TASK, "--size", "64*64", "--frame_num", str(FRAMES), "--ckpt_dir", str(ckpt),
            "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7",
            "--sample_steps", str(STEPS), "--save_file", str(out / "v.mp4"),
            "--save-latents", str(out / "v.safetensors"), *MAGCACHE]


def read_run(out: Path) -> dict:
    manifest = json.loads((out / "v.json").read_text())
    manifest["_latents"] = load_file(out / "v.safetensors")["latents"]
    return manifest


@pytest.fixture(scope="module")
def single_process(tiny_ckpt, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    proc = run_cli("generate", *generate_args(tiny_ckpt(TASK), out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_run(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launch", list(TEMPLATES))
def test_sbatch_template_generates_what_one_process_does(slurm_cluster, tiny_ckpt, single_process, tmp_path,
                                                         monkeypatch, launch):
    for var in ("MAGCACHE_LAUNCH_CMD", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # the real CLI; ranks come from Slurm or torchrun
    template, sbatch_args, kind = TEMPLATES[launch]
    out = tmp_path / "out"
    env = {"MAGCACHE_VENV": sys.prefix, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if launch == "torchrun":
        env |= {"MAGCACHE_NPROC_PER_NODE": "2", "MAGCACHE_RDZV_PORT": str(free_port())}
    code, text = submit_and_wait([*sbatch_args, template, *generate_args(tiny_ckpt(TASK), out), "--ulysses_size", "2"],
                                 timeout=420, env=env)
    assert code == 0, text[-3000:]
    assert f"{template.name}: job " in text and ": magcache-launch generate --task" in text, text[:2000]
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]

    info = read_mp4_info(out / "v.mp4")
    assert info["frames"] == FRAMES and info["fps"] == FPS and info["size"] == (64, 64), info
    run = read_run(out)
    assert run["world"]["size"] == 2 and run["world"]["launch"] == kind, run["world"]
    assert run["world"]["mesh"] == {"dp": 1, "cfg": 1, "sp": 2}, run["world"]
    assert len(run["peak_memory_mb"]) == 2

    a, b = run["_latents"], single_process["_latents"]
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, rel
    assert single_process["world"]["size"] == 1 and single_process["magcache"]["skipped_count"] > 0
    assert run["magcache"]["skipped_forwards"] == single_process["magcache"]["skipped_forwards"]
    assert [d["skip"] for d in run["magcache"]["decisions"]] == \
        [d["skip"] for d in single_process["magcache"]["decisions"]]
