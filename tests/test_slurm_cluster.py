"""Real Slurm: srun tasks forming a gloo world, and both sbatch templates end to end.

The templates run tests/slurm_jobs/fake_launch.py in place of `magcache-launch` (through
MAGCACHE_LAUNCH_CMD): each rank prints its rank environment after a real gloo all_reduce.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import REPO, slurm_cluster, submit_and_wait  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOBS = REPO / "tests" / "slurm_jobs"
GENERATE = REPO / "scripts" / "slurm" / "generate.sbatch"
GENERATE_TORCHRUN = REPO / "scripts" / "slurm" / "generate-torchrun.sbatch"
VENV = Path(sys.prefix)
ARGS = ["--task", "ti2v-5B", "--prompt", "a cat surfing", "--frame_num", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def job_env(**extra) -> dict:
    """Env for sbatch without this venv on PATH, so the template must find and activate it."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != (VENV / "bin").resolve())
    env = {"PATH": path, "MAGCACHE_LAUNCH_CMD": f"python {JOBS / 'fake_launch.py'}"}
    env.pop("VIRTUAL_ENV", None)
    return {**env, **extra}


def ranks(out: str) -> list[dict]:
    """The FAKE_LAUNCH records in a job's output, by rank (robust to lines run together)."""
    decoder, infos, tag = json.JSONDecoder(), [], "FAKE_LAUNCH {"
    at = out.find(tag)
    while at >= 0:
        infos.append(decoder.raw_decode(out, at + len(tag) - 1)[0])
        at = out.find(tag, at + 1)
    return sorted(infos, key=lambda i: i["rank"])


def test_srun_two_tasks_all_reduce_over_gloo(slurm_cluster):
    r = subprocess.run(["srun", "-n2", "--kill-on-bad-exit=1", sys.executable,
                        str(JOBS / "allreduce.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("ALLREDUCE"))
    assert len(lines) == 2, r.stdout + r.stderr
    fields = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines]
    assert [f["rank"] for f in fields] == ["0", "1"]
    assert all(f["world"] == "2" and f["sum"] == "3" for f in fields)
    assert fields[0]["master"] == fields[1]["master"]
    assert fields[0]["master"].split(":")[0] == socket.gethostname().split(".")[0]


def test_generate_sbatch_runs_one_srun_task_per_rank(slurm_cluster):
    code, out = submit_and_wait(["--ntasks-per-node=2", GENERATE, *ARGS], timeout=150,
                                env=job_env(MAGCACHE_VENV=str(VENV)))
    assert code == 0, out
    infos = ranks(out)
    assert [i["rank"] for i in infos] == [0, 1], out
    assert [i["local_rank"] for i in infos] == [0, 1]
    for i in infos:
        assert i["source"] == "slurm" and i["world"] == 2 and i["sum"] == 3.0
        assert i["argv"] == ["generate", *ARGS]
        assert Path(i["python"]).parent == VENV / "bin"  # `python` resolved through the venv


def test_generate_torchrun_sbatch_runs_torchrun_ranks(slurm_cluster):
    extra = {"MAGCACHE_NPROC_PER_NODE": "2", "MAGCACHE_RDZV_PORT": str(free_port())}
    if VENV.resolve() != (REPO / ".venv").resolve():
        extra["MAGCACHE_VENV"] = str(VENV)  # else: the template must find the repo's .venv
    code, out = submit_and_wait(["--cpus-per-task=2", GENERATE_TORCHRUN, *ARGS], timeout=150,
                                env=job_env(**extra))
    assert code == 0, out
    infos = ranks(out)
    assert [i["rank"] for i in infos] == [0, 1], out
    assert [i["local_rank"] for i in infos] == [0, 1]
    for i in infos:
        assert i["source"] == "torchrun" and i["world"] == 2 and i["sum"] == 3.0
        assert i["argv"] == ["generate", *ARGS]
        assert Path(i["python"]).parent == VENV / "bin"


@pytest.mark.parametrize("template,sbatch_args,extra", [
    (GENERATE, ["--ntasks-per-node=2"], {}),
    (GENERATE_TORCHRUN, ["--cpus-per-task=2"], {"MAGCACHE_NPROC_PER_NODE": "2"}),
], ids=["srun", "torchrun"])
def test_a_failing_rank_fails_the_job_instead_of_hanging(slurm_cluster, template, sbatch_args,
                                                         extra):
    # Rank 1 exits 3 before the all_reduce; rank 0 would wait for it until the gloo timeout
    # (60 s in fake_launch) unless the launcher kills it, so the 50 s limit catches a hang.
    extra = {**extra, "MAGCACHE_VENV": str(VENV), "MAGCACHE_RDZV_PORT": str(free_port())}
    code, out = submit_and_wait([*sbatch_args, template, *ARGS, "--fake-fail-rank", "1"],
                                timeout=50, env=job_env(**extra))
    assert code != 0, out
    assert "rank=1 failing on purpose" in out
    assert not ranks(out), out  # rank 0 never finished its all_reduce
