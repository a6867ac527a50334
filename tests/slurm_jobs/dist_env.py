"""Rank/world/rendezvous from the launcher's environment, for the Slurm test programs.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. A bare `srun` sets only
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID: the master is the first host of the job's node list
and the port is derived from SLURM_JOB_ID, so every task of a step agrees without talking.
"""
import os
import socket
import subprocess

import torch
import torch.distributed as dist


def first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def from_env() -> dict:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return dict(source="torchrun", rank=int(env["RANK"]), world=int(env["WORLD_SIZE"]),
                    local_rank=int(env["LOCAL_RANK"]), master_addr=env["MASTER_ADDR"],
                    master_port=int(env["MASTER_PORT"]))
    return dict(source="slurm", rank=int(env["SLURM_PROCID"]), world=int(env["SLURM_NTASKS"]),
                local_rank=int(env["SLURM_LOCALID"]),
                master_addr=first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]),
                master_port=15000 + int(env["SLURM_JOB_ID"]) % 10000)


def all_reduce_sum(info: dict, value: float, timeout_s: float = 60.0) -> float:
    """Join a gloo group from `info` and return the sum of `value` over all ranks."""
    from datetime import timedelta
    timeout = timedelta(seconds=timeout_s)
    if info["source"] == "torchrun":  # torchrun's agent already hosts the store at MASTER_PORT
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    else:
        store = dist.TCPStore(info["master_addr"], info["master_port"], info["world"],
                              is_master=info["rank"] == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=info["rank"], world_size=info["world"],
                                timeout=timeout)
    try:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())
    finally:
        dist.destroy_process_group()


def host() -> str:
    return socket.gethostname()
