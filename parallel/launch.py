"""How this process was launched: torchrun, an srun job step, or a plain single process.

Pure environment reading (no process group, no torch.distributed): the CLI validates a layout
against this before anything joins a rendezvous.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

LaunchKind = Literal["torchrun", "slurm", "single"]

#: Ports derived from a Slurm job id land here: above the well-known/registered ports most
#: daemons use and below Linux's ephemeral range (32768+), so an outgoing socket cannot hold it.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 10000


class LaunchError(ValueError):
    """The launch environment is inconsistent; the message says which variable and what to do."""


class RendezvousError(LaunchError):
    """This host cannot resolve or reach the rendezvous (MASTER_ADDR:MASTER_PORT).

    Unlike other launch errors it may hold on some hosts only, so every rank that meets it says so
    (`every_rank`), not rank 0 alone: rank 0's host usually reaches itself fine.
    """

    every_rank = True


# --------------------------------------------------------------------------- launch detection


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchEnv:
    """Who this process is in the job, as read from the environment."""

    kind: LaunchKind
    #: global rank of this process
    rank: int = 0
    #: number of processes in the job
    world_size: int = 1
    #: rank on this node; selects the GPU
    local_rank: int = 0
    #: rendezvous host (rank 0's node); None for a single process
    master_addr: str | None = None
    #: rendezvous port; None for a single process
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise LaunchError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"rank {self.rank} is outside world size {self.world_size}; check RANK/WORLD_SIZE")
        if self.local_rank < 0:
            raise LaunchError(f"local rank must be >= 0, got {self.local_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise LaunchError(f"MASTER_PORT {self.master_port} is not a TCP port; set MASTER_PORT to 1..65535")
        if self.world_size > 1 and (not self.master_addr or self.master_port is None):
            raise LaunchError(f"{self.kind} launch of {self.world_size} ranks has no rendezvous address; "
                              "set MASTER_ADDR and MASTER_PORT")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer; unset it or fix the launcher that set it") from None


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((environ[n] for n in names if environ.get(n)), None)


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """Same on every task of a step; the step is mixed in so concurrent steps of one job do not collide."""
    return SLURM_PORT_BASE + (job_id * 31 + step_id) % SLURM_PORT_SPAN


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun if RANK and WORLD_SIZE are set, an srun job step if SLURM_STEP_ID is, else single.

    Slurm: a batch script itself also carries SLURM_PROCID=0 and SLURM_NTASKS=N, but only one
    process runs there; only srun sets SLURM_STEP_ID, so a script started without srun is single
    instead of waiting forever for N-1 ranks that were never started.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return LaunchEnv(
            kind="torchrun",
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=_int_var(env, "MASTER_PORT") if port else None,
        )
    step = _first(env, "SLURM_STEP_ID", "SLURM_STEPID")
    if step is not None and "SLURM_PROCID" in env:
        world_name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
        world = _int_var(env, world_name) if env.get(world_name) else 1
        addr = env.get("MASTER_ADDR") or None
        nodes = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if addr is None and nodes:
            addr = first_host(nodes)
        if env.get("MASTER_PORT"):
            port_value: int | None = _int_var(env, "MASTER_PORT")
        elif env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"):
            job_name = "SLURM_JOB_ID" if env.get("SLURM_JOB_ID") else "SLURM_JOBID"
            step_id = int(step) if step.isdigit() else 0  # named steps ("batch", "extern") never run srun tasks
            port_value = slurm_port(_int_var(env, job_name), step_id)
        else:
            port_value = None
        return LaunchEnv(
            kind="slurm",
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int_var(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0,
            master_addr=addr,
            master_port=port_value,
        )
    return LaunchEnv(kind="single")


# --------------------------------------------------------------------------- Slurm host lists

_HOSTLIST_TOKEN = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: `a[1,2],b` -> [`a[1,2]`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in Slurm host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"bad range {item!r} in Slurm host list {whole!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"descending range {item!r} in Slurm host list {whole!r}")
        width = len(lo)  # Slurm keeps the zero padding of the lower bound: node[08-10] -> node08..node10
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list (`node[01-03,07],gpu5`, `r[1-2]-n[1-2]`) in Slurm's order.

    Our own parser rather than `scontrol show hostnames`: the address must be known on compute
    nodes where scontrol may be absent, and a subprocess per rank at startup buys nothing.
    """
    hosts: list[str] = []
    for part in _split_top_level(text):
        expansions = [""]
        pos = 0
        for match in _HOSTLIST_TOKEN.finditer(part):
            prefix = part[pos:match.start()]
            choices = _expand_range(match.group(1), text)
            expansions = [e + prefix + c for e in expansions for c in choices]
            pos = match.end()
        tail = part[pos:]
        if "[" in tail or "]" in tail:
            raise LaunchError(f"unbalanced brackets in Slurm host list {text!r}")
        hosts.extend(e + tail for e in expansions)
    if not hosts:
        raise LaunchError(f"empty Slurm host list {text!r}; set MASTER_ADDR to rank 0's host")
    return hosts


def first_host(text: str) -> str:
    """Rank 0 of an srun step runs on the first host of the step's node list."""
    return expand_hostlist(text)[0]
