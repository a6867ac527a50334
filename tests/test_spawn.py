"""`magcache-launch --nproc-per-node N`: ranks started by us end with the failing rank's one line and
exit code (torchrun buries it under its traceback and exits 1), issue 27 item 5."""
from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT, cli_env, run_cli

from parallel.spawn import spawn_local

RANK_SCRIPT = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"rank {rank} of {os.environ['WORLD_SIZE']} local {os.environ['LOCAL_RANK']} "
      f"at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
if sys.argv[1] == "fail" and rank == 1:
    print("some progress", file=sys.stderr)
    print("error: rank 1: the disk is full; free space", file=sys.stderr)
    sys.exit(3)
if sys.argv[1] == "fail":
    time.sleep(600)  # a survivor stuck in a collective: the spawner must end it
"""


def _run(mode: str, capfd, grace_s: float = 10.0) -> tuple[int, str, str]:
    code = spawn_local([sys.executable, "-c", RANK_SCRIPT, mode], 3, grace_s=grace_s)
    out, err = capfd.readouterr()
    return code, out, err


def test_every_rank_gets_torchrun_s_variables(capfd):
    code, out, err = _run("ok", capfd)
    assert code == 0 and err == ""
    lines = sorted(out.splitlines())
    assert [ln.split(" at ")[0] for ln in lines] == [f"rank {r} of 3 local {r}" for r in range(3)]
    assert len({ln.split(" at ")[1] for ln in lines}) == 1  # one rendezvous address for all


def test_the_first_failure_ends_the_job_with_its_line_and_code(capfd):
    t0 = time.perf_counter()
    code, _, err = _run("fail", capfd, grace_s=1.0)
    assert time.perf_counter() - t0 < 60  # the sleeping survivors were terminated, not waited for
    lines = err.strip().splitlines()
    assert code == 3 and "some progress" in lines
    assert lines[-1] == "error: rank 1: the disk is full; free space (rank 1 exited 3; 3 of 3 ranks failed)"


def test_bad_input_on_two_ranks_exits_2_with_the_reason_last(tmp_path):
    proc = run_cli("--nproc-per-node", "2", "generate", "--task", "t2v-A14B", "--frame_num", "8", "--prompt", "a cat",
                   "--ckpt_dir", str(tmp_path), "--save_file", str(tmp_path / "v.mp4"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == ("error: --frame_num 8: must be 4n+1 (1, 5, 9, ..., 81) (rank 0 exited 2; 2 of 2 ranks "
                         "failed)")
    assert run_cli("--nproc-per-node", "x", "generate").stderr.strip() == (
        "error: --nproc-per-node 'x': give the number of ranks to start, e.g. --nproc-per-node 4 generate ...")
    inside = subprocess.run([sys.executable, "-m", "launcher", "--nproc-per-node=2", "plan"], capture_output=True,
                            text=True, env=cli_env(RANK="0", WORLD_SIZE="2"), cwd=ROOT, timeout=120)
    assert inside.returncode == 2 and "already one rank of a job" in inside.stderr
