"""Run a script from this folder under a real `torchrun --standalone` gloo job and collect results.

Jobs print one `RESULT <json>` line per rank (a single os.write, so lines of different ranks never
interleave). A job counts as failed if torchrun exits non-zero or any rank printed the libstdc++
abort message, which torchrun does not always turn into a non-zero exit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

JOBS = Path(__file__).resolve().parent
REPO = JOBS.parents[1]
ABORT = "terminate called"
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class JobRun:
    returncode: int
    output: str
    results: list[dict]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and ABORT not in self.output

    def by_rank(self) -> dict[int, dict]:
        return {r["rank"]: r for r in self.results}


def run_job(script: str, nproc: int, *args: str, timeout: float = 180) -> JobRun:
    """`python -m torch.distributed.run --standalone --nproc-per-node N <script> ARGS` on gloo."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(JOBS / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    output = proc.stdout + proc.stderr
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return JobRun(proc.returncode, output, results)


def emit(payload: dict) -> None:
    """One `RESULT` line from a rank, written atomically."""
    os.write(1, ("RESULT " + json.dumps(payload) + "\n").encode())
