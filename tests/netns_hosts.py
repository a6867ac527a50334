"""Several "hosts" on this machine: Linux network namespaces on one bridge, each with its own address,
hostname (a UTS namespace per launch) and /etc/hosts, so the product runs across a real host boundary.

Topology: a "switch" namespace holding a bridge, and per host a namespace with one veth whose peer
is a bridge port. Addresses come from a private test range (10.231.0.0/24) that exists only inside
these namespaces; nothing touches the machine's own network stack.

Each host's /etc/hosts (/etc/netns/<ns>/hosts, bind-mounted over /etc/hosts in a private mount namespace) maps its
own name to 127.0.1.1, like a Debian/Ubuntu install, and the other hosts to their addresses: the
usual case in which gloo, asked for "the hostname's address", binds to loopback.

Teardown kills what the harness started (process groups by PID), then every PID still inside
the namespaces (all started by the harness or its children), then deletes the namespaces and the
/etc/netns entries; it runs on failure too (`hosts()` is a context manager).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.0"
NETNS_ETC = Path("/etc/netns")
_made = 0  # sets of hosts made by this process: a letter in the tag keeps them apart


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, no veth); the message says which."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    """One "host": a network namespace, its address on the bridge, its hostname."""

    name: str
    netns: str
    addr: str
    #: the host's interface on the bridge (inside its namespace)
    ifname: str
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host: its network namespace, /etc/hosts, and a UTS namespace named `name`.

        nsenter + our own bind mount of /etc/hosts rather than `ip netns exec`, which also remounts
        /sys for the namespace and so hides /sys/fs/cgroup (slurmd refuses to start without it).
        """
        script = 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", script, self.name, str(NETNS_ETC / self.netns / "hosts"), *argv]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `argv` on this host in its own process group (so teardown can kill the whole tree)."""
        proc = subprocess.Popen(self.argv(argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), check=False, **kwargs)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (started by the harness or its children)."""
        return [int(p) for p in _ip("netns", "pids", self.netns, check=False).stdout.split()]

    @staticmethod
    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    def kill_all(self) -> list[int]:
        """SIGKILL every process in this host's namespace: the node "dies" (returns the PIDs killed)."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def link(self, up: bool) -> None:
        """Take this host's cable out (down) or put it back (up): no RST, packets just vanish."""
        _ip("-n", self.netns, "link", "set", self.ifname, "up" if up else "down")


@dataclass
class Hosts:
    switch: str
    bridge: str
    hosts: list[Host]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when namespaces cannot be made here."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        raise NetnsUnavailable("no Linux network namespaces on this system")
    if os.geteuid() != 0:
        raise NetnsUnavailable("creating network namespaces needs root (run the suite as root or in a privileged container)")
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (iproute2 / util-linux)")


def _hosts_file(me: int, names: list[str], addrs: list[str]) -> str:
    lines = ["127.0.0.1 localhost", f"127.0.1.1 {names[me]}"]
    lines += [f"{a} {n}" for i, (n, a) in enumerate(zip(names, addrs)) if i != me]
    return "\n".join(lines) + "\n"


def _create(tag: str, n: int) -> Hosts:
    switch, bridge = f"{tag}-sw", f"{tag}br"
    _ip("netns", "add", switch)
    _ip("-n", switch, "link", "add", bridge, "type", "bridge")
    _ip("-n", switch, "link", "set", bridge, "up")
    names = [f"node{i}" for i in range(n)]
    addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
    made: list[Host] = []
    for i, (name, addr) in enumerate(zip(names, addrs)):
        ns, inner, outer = f"{tag}-{name}", f"{tag}e{i}", f"{tag}p{i}"
        _ip("netns", "add", ns)
        made.append(Host(name=name, netns=ns, addr=addr, ifname=inner))
        _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", switch)
        _ip("-n", switch, "link", "set", outer, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(_hosts_file(i, names, addrs))
    return Hosts(switch=switch, bridge=bridge, hosts=made)


def _destroy(tag: str, hosts: list[Host]) -> None:
    for host in hosts:
        for proc in host.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in host.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    for ns in [h.netns for h in hosts] + [f"{tag}-sw"]:
        for _ in range(20):  # processes started inside (slurmd's job steps...) by their PIDs in the namespace
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


_TAG = re.compile(r"^mc(\d+)[a-z]-")


def _remove_stale() -> None:
    """Namespaces left by a test process that was killed before its teardown ran (its PID is gone)."""
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in listing if line.strip()]
    stale: dict[str, list[Host]] = {}
    for name in names:
        m = _TAG.match(name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        tag = name.split("-", 1)[0]
        stale.setdefault(tag, [])
        if not name.endswith("-sw"):
            stale[tag].append(Host(name="", netns=name, addr="", ifname=""))
    for tag, left in stale.items():
        _destroy(tag, left)


@contextlib.contextmanager
def hosts(n: int = 2, tag: str | None = None) -> Iterator[Hosts]:
    """`n` hosts (node0..node{n-1} at 10.231.0.1..n) on one bridge; torn down on exit, also on failure.

    `tag` names the namespaces and links (unique per process by default, so parallel sessions never meet).
    """
    check_available()
    global _made
    _made += 1
    _remove_stale()
    tag = tag or f"mc{os.getpid()}{chr(ord('a') + _made % 26)}"
    made: Hosts | None = None
    try:
        made = _create(tag, n)
    except subprocess.CalledProcessError as e:
        _destroy(tag, [Host(name=f"node{i}", netns=f"{tag}-node{i}", addr="", ifname="") for i in range(n)])
        raise NetnsUnavailable(f"could not create network namespaces: {' '.join(e.cmd)}: {e.stderr.strip()}") from None
    try:
        yield made
    finally:
        _destroy(tag, made.hosts)
