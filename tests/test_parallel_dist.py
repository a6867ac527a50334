"""parallel.dist: launch detection from env dicts, Slurm host lists, single-process init, and clean exits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parallel.dist import agree_min, init_distributed, reduce_sum
from parallel.launch import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    LaunchEnv,
    LaunchError,
    detect_launch,
    expand_hostlist,
    first_host,
    slurm_port,
)
from parallel_jobs.spawn import run_job

TORCHRUN = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29511")
SRUN = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_STEP_ID="0", SLURM_JOB_ID="123456",
            SLURM_JOB_NODELIST="gpu[07-08],cpu1")


def test_torchrun_env_is_read_as_is():
    env = detect_launch(TORCHRUN)
    assert env == LaunchEnv(kind="torchrun", rank=3, world_size=4, local_rank=1,
                            master_addr="10.0.0.7", master_port=29511)


def test_torchrun_wins_over_slurm_when_both_are_set():
    # torchrun started by srun: the agent's RANK is the truth, SLURM_PROCID is the node's task.
    assert detect_launch({**SRUN, **TORCHRUN}).kind == "torchrun"


def test_srun_step_without_torchrun():
    env = detect_launch(SRUN)
    assert (env.kind, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert env.master_addr == "gpu07"
    assert env.master_port == slurm_port(123456, 0)


def test_srun_step_prefers_step_values_and_env_override():
    env = detect_launch({**SRUN, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_NODELIST": "n[3-4]"})
    assert (env.world_size, env.master_addr) == (6, "n3")
    env = detect_launch({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "4242"})
    assert (env.master_addr, env.master_port) == ("head", 4242)


def test_batch_script_without_srun_is_single():
    # sbatch exports SLURM_PROCID=0 and SLURM_NTASKS=N to the batch script; only srun sets a step.
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    assert detect_launch(batch) == LaunchEnv(kind="single")


def test_no_launcher_is_single():
    assert detect_launch({}) == LaunchEnv(kind="single")


def test_slurm_port_is_deterministic_and_in_range():
    ports = {slurm_port(job, step) for job in range(0, 50_000, 7) for step in range(3)}
    assert all(SLURM_PORT_BASE <= p < SLURM_PORT_BASE + SLURM_PORT_SPAN for p in ports)
    assert slurm_port(987654, 1) == slurm_port(987654, 1) != slurm_port(987654, 2)


@pytest.mark.parametrize("env, fragment", [
    ({**TORCHRUN, "RANK": "x"}, "RANK='x'"),
    ({**TORCHRUN, "RANK": "4"}, "outside world size"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "not a TCP port"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "set MASTER_ADDR"),
    ({**SRUN, "SLURM_NTASKS": "eight"}, "SLURM_NTASKS"),
])
def test_bad_launch_env_raises_one_line(env, fragment):
    with pytest.raises(LaunchError, match=fragment) as info:
        detect_launch(env)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a1", ["a1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("x[1],y[2-3]z", ["x1", "y2z", "y3z"]),
])
def test_hostlist_expansion(text, hosts):
    assert expand_hostlist(text) == hosts
    assert first_host(text) == hosts[0]


@pytest.mark.parametrize("text", ["node[1-", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_bad_hostlist_raises(text):
    with pytest.raises(LaunchError):
        expand_hostlist(text)


@given(prefix=st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True),
       lo=st.integers(0, 500), count=st.integers(1, 40), width=st.integers(1, 4))
def test_hostlist_ranges_keep_order_and_padding(prefix, lo, count, width):
    hi = lo + count - 1
    text = f"{prefix}[{str(lo).zfill(width)}-{hi}]"
    hosts = expand_hostlist(text)
    assert hosts == [prefix + str(n).zfill(width) for n in range(lo, hi + 1)]


def test_single_process_creates_no_process_group():
    with init_distributed(LaunchEnv(kind="single"), device_preference="cpu") as ctx:
        assert not ctx.is_distributed and ctx.cpu_group is None
        assert not torch.distributed.is_initialized()
        assert agree_min(ctx.cpu_group)(True) is True and agree_min(None)(False) is False
        t = torch.ones(3)
        assert reduce_sum(None)(t) is t
    assert not torch.distributed.is_initialized()


def test_bad_device_preference_and_timeout():
    with pytest.raises(LaunchError, match="device preference"):
        init_distributed(LaunchEnv(kind="single"), device_preference="tpu")  # type: ignore[arg-type]
    with pytest.raises(LaunchError, match="timeout must be positive"):
        init_distributed(LaunchEnv(kind="single"), timeout=0)


@pytest.mark.slow
def test_agree_min_on_two_ranks_and_its_cost():
    run = run_job("job_mesh.py", 2, "2", "1", "2000")
    assert run.ok, run.output[-4000:]
    for rank, res in run.by_rank().items():
        # Round r: only rank r says "cannot skip", so both ranks must compute every round.
        assert res["votes"] == [False, False] and res["world_votes"] == [False, False]
        assert res["agree_us"] > 0
        print(f"agree_min on 2 gloo ranks: {res['agree_us']:.0f} us per call, bare all_reduce "
              f"{res['raw_allreduce_us']:.0f} us (rank {rank})")


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(5))
def test_two_rank_gloo_job_exits_cleanly(attempt):
    """The exit abort was a race (~1 in 3); after shutdown no gloo thread is left to race with."""
    run = run_job("job_exit.py", 2)
    assert run.ok, run.output[-4000:]
    for res in run.by_rank().values():
        assert res["threads_during"] > res["threads_before"]
        assert res["threads_after"] == res["threads_before"]


def test_nccl_failure_settings_fill_only_what_the_user_left_unset(monkeypatch):
    """Issue 12 defect 9: on NCCL the watchdog must tear a survivor down at --dist-timeout (the
    group timeout) rather than leave it blocked, without a flight-recorder dump delaying the exit.
    CPU-only machines cannot run NCCL; this pins the settings, `scripts/gpu_check.py` S5 the groups."""
    from parallel.dist import NCCL_FAILURE_ENV, nccl_failure_settings

    for key in NCCL_FAILURE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")  # the user's choice wins
    assert nccl_failure_settings() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


@pytest.mark.slow
def test_a_dead_peer_ends_the_survivor_by_abort_within_seconds():
    """The failure path aborts the groups (a graceful NCCL destroy can hang on a dead peer); on gloo,
    the same code: the survivor's collective fails, teardown ends in seconds, no thread is left."""
    run = run_job("job_peer_dies.py", 2, timeout=120)
    assert run.returncode != 0 and "terminate called" not in run.output, run.output[-4000:]
    survivor = run.by_rank()[0]
    assert survivor["error"] is not None and survivor["ended_by"] == "abort" and not survivor["initialized"]
    assert survivor["seconds"] < 20, survivor
    assert survivor["threads_after"] == survivor["threads_before"], survivor
