"""A real local Slurm cluster for tests, and a helper that submits a batch job and waits for it.

Use from a test module:

    from slurm_helpers import slurm_cluster, submit_and_wait  # noqa: F401 (fixture)

    @pytest.mark.slurm
    def test_x(slurm_cluster):
        code, out = submit_and_wait(["--ntasks=2", "job.sbatch"], timeout=120)

`slurm_cluster` (session scope) runs `scripts/slurm/local_cluster.sh start` once, skips the test
with the script's one-line reason when it exits 77 (cannot install Slurm here), sets SLURM_CONF in
os.environ for the session, and stops the cluster at the end only if this session started it (a
cluster started beforehand, e.g. by CI, is reused and left running).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm" / "local_cluster.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


@dataclass(frozen=True)
class SlurmCluster:
    conf: str           # path of the cluster's slurm.conf (also in os.environ["SLURM_CONF"])
    started_here: bool  # this session started it, so this session stops it


@pytest.fixture(scope="session")
def slurm_cluster():
    r = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True,
                       timeout=900)
    reason = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
    if r.returncode == 77:
        pytest.skip(f"no local Slurm cluster: {reason}")
    if r.returncode != 0:
        pytest.fail(f"local_cluster.sh start failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    conf = next(line.split("=", 1)[1] for line in r.stdout.splitlines()
                if line.startswith("export SLURM_CONF="))
    cluster = SlurmCluster(conf=conf, started_here="# local_cluster: started" in r.stdout)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if cluster.started_here:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "SLURM_CONF": conf})


def _task_states(job_id: str, env: dict) -> list[tuple[str, str]]:
    """(JobState, ExitCode) of the job, or of every task of an array job, from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, timeout=30, env=env).stdout
    rows = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]
    return [(r.get("JobState", "UNKNOWN"), r.get("ExitCode", "0:0")) for r in rows] or [("UNKNOWN", "0:0")]


def _exit_status(exit_code: str) -> int:
    """scontrol's ExitCode "rc:signal" as a shell would report it: rc, or 128+signal."""
    rc, _, sig = exit_code.partition(":")
    return int(rc) if int(rc) else (128 + int(sig or 0) if int(sig or 0) else 0)


def wait_for_job(job_id: str, timeout: float, env: dict[str, str], output: Callable[[], str]) -> int:
    """Poll until the job (every task of an array job) has ended; return the highest exit status.

    We poll scontrol every 0.25 s rather than use `sbatch --wait`, whose checks back off to 32 s apart
    (they stay 2 s apart only below MinJobAge/4): a 12 s job was seen done after 42 s. On timeout the
    job is cancelled and TimeoutError carries `output()`."""
    deadline = time.monotonic() + timeout
    states = _task_states(job_id, env)
    while not all(state in TERMINAL_STATES for state, _ in states):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30, env=env)
            raise TimeoutError(f"job {job_id} still {sorted({s for s, _ in states})} after {timeout}s (cancelled); "
                               f"output so far:\n{output()}")
        time.sleep(0.25)
        states = _task_states(job_id, env)
    return max(_exit_status(code) for _, code in states)


def submit(sbatch_args: list, env: dict[str, str], output: str) -> str:
    """sbatch --parsable with --output=`output`; the job id."""
    sub = subprocess.run(["sbatch", "--parsable", f"--output={output}", *map(str, sbatch_args)],
                         capture_output=True, text=True, timeout=60, env=env)
    if sub.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(map(str, sbatch_args))} failed: {sub.stderr.strip()}")
    return sub.stdout.strip().split(";")[0]


def submit_and_wait(sbatch_args: list[str], timeout: float,
                    env: dict[str, str] | None = None) -> tuple[int, str]:
    """Submit with sbatch, wait until the job ends, return (exit_code, job stdout+stderr).

    exit_code is the batch script's exit status, or 128+signal when a signal ended it. `env`
    entries are added to os.environ for sbatch (and so exported into the job). On timeout the
    job is cancelled and TimeoutError carries the output so far.
    """
    run_env = {**os.environ, **(env or {})}
    out_path = Path(tempfile.mkdtemp(prefix="magcache-sbatch-")) / "job.out"

    def text() -> str:
        return out_path.read_text(errors="replace") if out_path.exists() else ""

    code = wait_for_job(submit(sbatch_args, run_env, str(out_path)), timeout, run_env, text)
    return code, text()
