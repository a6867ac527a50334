"""Real Slurm: `batch.sbatch` and `batch-array.sbatch` run the real CLI on a tiny checkpoint.

An array of 2 tasks cuts a 3-item file into shards 0/2 and 1/2 sharing one --out-dir: together
they write every video, each writes its own summary, and resubmitting skips what is done.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from slurm_helpers import REPO, slurm_cluster, submit, submit_and_wait, wait_for_job  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

BATCH = REPO / "scripts" / "slurm" / "batch.sbatch"
ARRAY = REPO / "scripts" / "slurm" / "batch-array.sbatch"
VENV = Path(sys.prefix)
FLAGS = ["--task", "ti2v-5B", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2"]


def job_env(**extra: str) -> dict[str, str]:
    """Without this venv on PATH, so the template must activate MAGCACHE_VENV; one thread per task."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != (VENV / "bin").resolve())
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": path, "MAGCACHE_VENV": str(VENV), "OMP_NUM_THREADS": "1", **extra}


def submit_array_and_wait(args: list, timeout: float, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Submit an array job and wait for every task: (highest task exit code, {task id: its output})."""
    logs = Path(tempfile.mkdtemp(prefix="magcache-array-"))

    def outputs() -> dict[str, str]:
        return {p.stem: p.read_text(errors="replace") for p in logs.glob("*.out")}

    code = wait_for_job(submit(args, env, f"{logs}/%a.out"), timeout, env,
                        lambda: " | ".join(text[-1500:] for text in outputs().values()))
    return code, outputs()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a red car at night", "seed": 1}, {"prompt": "a cat surfing", "name": "cat", "seed": 2},
             {"prompt": "a lighthouse in a storm", "seed": 3}]
    path.write_text("".join(json.dumps(item) + "\n" for item in lines))
    return path


def test_array_of_two_tasks_shares_the_file_and_the_out_dir(slurm_cluster, tiny_ckpt, prompts, tmp_path):
    out = tmp_path / "out"
    args = ["--array=0-1", ARRAY, prompts, "--out-dir", out, "--ckpt_dir", tiny_ckpt("ti2v-5B"), *FLAGS]
    code, logs = submit_array_and_wait(args, timeout=400, env=job_env())
    assert code == 0, logs
    assert sorted(logs) == ["0", "1"]
    assert "(shard 0/2)" in logs["0"] and "(shard 1/2)" in logs["1"]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["00000.mp4", "00002.mp4", "cat.mp4"]
    shard0 = json.loads((out / "summary-shard-0-of-2.json").read_text())
    shard1 = json.loads((out / "summary-shard-1-of-2.json").read_text())
    assert [(i["name"], i["status"]) for i in shard0["items"]] == [("00000", "ok"), ("00002", "ok")]
    assert [(i["name"], i["status"]) for i in shard1["items"]] == [("cat", "ok")]
    assert shard0["shard"] == "0/2" and shard1["shard"] == "1/2"
    assert not (out / "summary.json").exists()

    # The same submission again: every prompt verifies and is skipped.
    code, logs = submit_array_and_wait(args, timeout=400, env=job_env())
    assert code == 0, logs
    again = [json.loads((out / f"summary-shard-{k}-of-2.json").read_text()) for k in (0, 1)]
    assert [i["status"] for s in again for i in s["items"]] == ["skipped"] * 3


def test_batch_sbatch_one_allocation_many_prompts(slurm_cluster, tiny_ckpt, prompts, tmp_path):
    out = tmp_path / "out"
    code, text = submit_and_wait(["--ntasks-per-node=1", BATCH, prompts, "--out-dir", out, "--ckpt_dir",
                                  tiny_ckpt("ti2v-5B"), *FLAGS], timeout=300, env=job_env())
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 3, "skipped": 0, "failed": 0}
    assert summary["world"]["size"] == 1


def test_a_failing_prompt_fails_the_job_with_exit_3(slurm_cluster, tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a size the model cannot use", "size": "70*64"}) + "\n")
    code, text = submit_and_wait(["--ntasks-per-node=1", BATCH, prompts, "--out-dir", tmp_path / "out",
                                  "--ckpt_dir", tiny_ckpt("ti2v-5B"), *FLAGS], timeout=300, env=job_env())
    assert code == 3, text
    assert "--size 70*64" in text


@pytest.mark.parametrize("sbatch_args,message", [
    ([], "not an array job: submit with --array=0-N"),
    (["--array=0-1"], "do not pass --shard"),
    (["--array=0,2"], "--array must be one contiguous range"),
])
def test_array_template_refuses_what_would_shard_wrongly(slurm_cluster, prompts, tmp_path, sbatch_args, message):
    extra = ["--shard", "0/2"] if "--array=0-1" in sbatch_args else []
    args = [*sbatch_args, ARRAY, prompts, "--out-dir", tmp_path / "out", *FLAGS, *extra]
    if sbatch_args:
        code, logs = submit_array_and_wait(args, timeout=120, env=job_env())
        text = "\n".join(logs.values())
    else:
        code, text = submit_and_wait(args, timeout=120, env=job_env())
    assert code == 2, text
    assert message in text
    assert not (tmp_path / "out").exists()
