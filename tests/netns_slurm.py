"""A real two-node Slurm cluster on the namespace hosts of tests/netns_hosts.py.

slurmctld and slurmd "node0" run on host node0, slurmd "node1" on host node1; each NodeName has
its host's address, so every job launch, srun I/O connection and rendezvous crosses the bridge.
munged runs once in the machine's own namespace: Slurm reaches it through a socket file, which
every namespace shares (one filesystem, as on a cluster with a shared key). Clients (sbatch,
scontrol) run on node0. All state lives in a temp dir; daemons are started by the harness and
killed by PID (the namespaces' teardown kills whatever else is left inside them).

Reuses the shape of scripts/slurm/local_cluster.sh (same plugins and timeouts), with per-node
spool, pid and log files (`%n`) because both slurmd share the filesystem.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netns_hosts import Hosts, NetnsUnavailable

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


#: the one slurm.conf template, also filled by scripts/slurm/local_cluster.sh
TEMPLATE = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "slurm.conf.template"


def _conf(d: Path, hosts: Hosts, sock: Path, cpus: int) -> str:
    h0 = hosts[0]
    nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr} NodeHostname={h.name} CPUs={cpus} RealMemory=2048 "
                      "State=UNKNOWN" for h in hosts.hosts)
    return string.Template(TEMPLATE.read_text()).substitute(
        HEADER="two-node test cluster over network namespaces (tests/netns_slurm.py)", CLUSTER="magcachenetns",
        CTLD_HOST=f"{h0.name}({h0.addr})", CTLD_PORT=6817, SLURMD_PORT=6818, MUNGE_SOCKET=sock, STATE_DIR=d,
        SLURMD_SPOOL="%n", PER_NODE="-%n", NODES=nodes, PARTITION_NODES=",".join(h.name for h in hosts.hosts))


@dataclass
class NetnsSlurm:
    hosts: Hosts
    conf: Path
    dir: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def client(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60):
        """A Slurm client command run on node0."""
        return self.hosts[0].run(argv, capture_output=True, text=True, timeout=timeout, env=env or self.env())

    def job_state(self, job_id: str) -> tuple[str, str, str]:
        """(JobState, ExitCode, NodeList) of a job (an array's first task for an array)."""
        out = self.client(["scontrol", "show", "job", "-o", job_id]).stdout.splitlines()
        fields = dict(f.split("=", 1) for f in (out[0].split() if out else []) if "=" in f)
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "0:0"), fields.get("NodeList", "")

    def submit(self, args: list[str], out: Path, env: dict[str, str]) -> str:
        sub = self.client(["sbatch", "--parsable", f"--output={out}", *args], env=self.env(env))
        if sub.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {sub.stderr.strip()}")
        return sub.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float) -> tuple[str, int, str]:
        """Wait for a job to end: (state, exit code as the shell sees it, node list)."""
        deadline = time.monotonic() + timeout
        while True:
            state, code, nodes = self.job_state(job_id)
            if state in TERMINAL:
                break
            if time.monotonic() > deadline:
                self.client(["scancel", job_id])
                raise TimeoutError(f"job {job_id} still {state} after {timeout}s (cancelled)")
            time.sleep(0.25)
        rc, _, sig = code.partition(":")
        return state, int(rc) if int(rc) else (128 + int(sig) if int(sig or 0) else 0), nodes


def _launch(argv: list[str], log: Path, procs: list[subprocess.Popen]) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    procs.append(proc)
    return proc


def _wait(what: str, check, limit: float, procs: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + limit
    while not check():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(logs.glob("*")))
            raise RuntimeError(f"two-node Slurm: {'a daemon exited' if dead else 'timed out'} waiting for {what}\n{tails}")
        time.sleep(0.5)


@contextlib.contextmanager
def netns_slurm(hosts: Hosts, base: Path, cpus: int = 4) -> Iterator[NetnsSlurm]:
    """slurmctld + one slurmd per host, up and idle; stopped by PID on exit (also on failure)."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "setpriv"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (scripts/slurm/local_cluster.sh start installs Slurm)")
    d = base
    for sub in ("etc", "log", "run", "spool/ctld", "munge", "munge-run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for h in hosts.hosts:
        (d / "spool" / h.name).mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    shutil.chown(d / "munge", "munge", "munge")
    shutil.chown(d / "munge-run", "munge", "munge")
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    os.chmod(key, 0o400)
    sock = d / "munge-run" / "munge.socket.2"
    conf = d / "etc" / "slurm.conf"
    conf.write_text(_conf(d, hosts, sock, cpus))
    procs: list[subprocess.Popen] = []
    try:
        _launch(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "--foreground",
                 f"--key-file={key}", f"--socket={sock}", f"--pid-file={d}/munge/munged.pid",
                 f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/munged.seed"], d / "log" / "munged.out", procs)
        _wait("munged", sock.exists, 15, procs, d / "log")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        _launch(hosts[0].argv(["slurmctld", "-D", "-c", "-i", "-f", str(conf)]), d / "log" / "slurmctld.out", procs)
        for h in hosts.hosts:
            _launch(h.argv(["slurmd", "-D", "-f", str(conf), "-N", h.name]), d / "log" / f"slurmd-{h.name}.out", procs)
        cluster = NetnsSlurm(hosts=hosts, conf=conf, dir=d)

        def all_idle() -> bool:
            res = hosts[0].run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15, env=env)
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            return all(states.get(h.name) == "idle" for h in hosts.hosts)

        _wait("both nodes idle", all_idle, 90, procs, d / "log")
        yield cluster
    finally:
        for p in reversed(procs):  # slurmd, slurmctld, then munged: the daemons still need it to say goodbye
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
