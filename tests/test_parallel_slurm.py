"""parallel.dist under a real `srun -n2` (no torchrun): Slurm detection, host list, port, clean exit."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from parallel_jobs.spawn import ABORT, JOBS, REPO
from slurm_helpers import slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_srun_tasks_form_the_mesh_without_torchrun(slurm_cluster):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(["srun", "-n2", "--kill-on-bad-exit=1", sys.executable, str(JOBS / "job_mesh.py"), "2", "1"],
                         capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and ABORT not in output, output[-4000:]
    results = sorted((json.loads(line[len("RESULT "):]) for line in run.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], output[-4000:]
    for res in results:
        assert res["kind"] == "slurm" and res["world"] == 2
        assert res["branch"] == [0, 1] and res["votes"] == [False, False]
    assert results[0]["master"] == results[1]["master"]
    assert results[0]["master"][0] == socket.gethostname().split(".")[0]
