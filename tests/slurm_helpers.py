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


def _job_state(job_id: str, env: dict) -> tuple[str, str]:
    """(JobState, ExitCode) from scontrol, e.g. ("COMPLETED", "0:0")."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, timeout=30, env=env).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "0:0")


def submit_and_wait(sbatch_args: list[str], timeout: float,
                    env: dict[str, str] | None = None) -> tuple[int, str]:
    """Submit with sbatch, wait until the job ends, return (exit_code, job stdout+stderr).

    exit_code is the batch script's exit status, or 128+signal when a signal ended it. `env`
    entries are added to os.environ for sbatch (and so exported into the job). On timeout the
    job is cancelled and TimeoutError carries the output so far.
    """
    run_env = {**os.environ, **(env or {})}
    out_path = Path(tempfile.mkdtemp(prefix="magcache-sbatch-")) / "job.out"
    sub = subprocess.run(["sbatch", "--parsable", f"--output={out_path}", *map(str, sbatch_args)],
                         capture_output=True, text=True, timeout=60, env=run_env)
    if sub.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(map(str, sbatch_args))} failed: {sub.stderr.strip()}")
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    state, exit_code = _job_state(job_id, run_env)
    while state not in TERMINAL_STATES:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30, env=run_env)
            text = out_path.read_text(errors="replace") if out_path.exists() else ""
            raise TimeoutError(f"job {job_id} still {state} after {timeout}s (cancelled); "
                               f"output so far:\n{text}")
        time.sleep(0.25)
        state, exit_code = _job_state(job_id, run_env)
    text = out_path.read_text(errors="replace") if out_path.exists() else ""
    rc, _, sig = exit_code.partition(":")
    code = int(rc) if int(rc) else (128 + int(sig or 0) if int(sig or 0) else 0)
    return code, text
