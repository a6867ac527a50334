"""Which network interface this rank's collectives must use, so that ranks on other hosts reach it.

gloo (and NCCL's bootstrap) bind to "the address of this host's name" unless GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME say otherwise. On most installs the host name resolves to a loopback address
(Debian's `127.0.1.1 <hostname>`), so every rank binds to loopback, the ranks of another node get
"connection refused", and the first node waits for them until the timeout.

The fix is routing, not guessing: the interface to use is the one the kernel would send packets
through towards the peers. On a node other than rank 0's, MASTER_ADDR is such a peer: the source
address of a route to it names the interface. On rank 0's own node MASTER_ADDR usually resolves to
loopback, which says nothing; there the ranks of the other nodes have already told us (through
the rendezvous store, before any gloo socket exists) which address they reach us from, and the
route back to that address names the interface. A job whose ranks all see MASTER_ADDR as loopback
is one host: nothing is set and gloo keeps its default.

Pure sockets and /proc: no torch here; `parallel.dist` calls this between the store and the group.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from parallel.launch import LaunchError, RendezvousError

#: the variables a user (or a cluster's module system) sets to choose the interface by hand
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

_SIOCGIFADDR = 0x8915


def resolve(host: str, port: int) -> str:
    """MASTER_ADDR as an IP address, or a one-line LaunchError saying it does not resolve here."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RendezvousError(f"MASTER_ADDR={host} does not resolve on host {socket.gethostname()} ({e}); "
                          "set MASTER_ADDR to rank 0's host name or IP address as every node sees it") from None
    # prefer IPv4 like TCPStore does when a name has both
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def route_source(address: str) -> str:
    """The local address the kernel would send from towards `address` (no packet is sent: UDP connect)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 9))
        except OSError as e:
            raise RendezvousError(f"no route from host {socket.gethostname()} to {address} ({e.strerror}); "
                              "check MASTER_ADDR and this node's network") from None
        return str(s.getsockname()[0])


def wait_for_port(host: str, address: str, port: int, timeout_s: float) -> None:
    """Return once `address:port` accepts a TCP connection; RendezvousError after `timeout_s`.

    Our own probe before TCPStore's client: its retries print a C++ stack per attempt, and its
    final error reads like a peer that died rather than a rendezvous nobody could reach.
    """
    import time

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((address, port), timeout=max(0.05, min(left, 2.0))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        if time.monotonic() + 0.2 >= deadline:
            break
        time.sleep(0.2)
    shown = host if host == address else f"{host} ({address})"
    raise RendezvousError(f"could not reach the rendezvous at {shown}:{port} from host {socket.gethostname()} "
                          f"within {timeout_s:g} s (--dist-timeout): {last}; check that rank 0's node is up, that "
                          "MASTER_ADDR/MASTER_PORT name it, and that the port is open from this host")


def _ipv4_of(name: str) -> str | None:
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None  # no IPv4 address on this interface
    return socket.inet_ntoa(raw[20:24])


def _ipv6_addresses(proc: Path = Path("/proc/net/if_inet6")) -> Iterable[tuple[str, str]]:
    if not proc.exists():
        return []
    out = []
    for line in proc.read_text().splitlines():
        fields = line.split()
        if len(fields) == 6:
            out.append((fields[5], str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))))
    return out


def interface_of(address: str) -> str | None:
    """The name of the local interface that holds `address` (None if no interface does)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        return next((name for name, a in _ipv6_addresses() if ipaddress.ip_address(a) == ip), None)
    return next((name for _, name in socket.if_nameindex() if _ipv4_of(name) == address), None)


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


@dataclass(frozen=True)
class Route:
    """How this rank reaches the others: the address and interface its collectives bind to."""

    #: MASTER_ADDR as given, and what it resolved to on this host
    master_host: str
    master_port: int
    master_ip: str
    #: the interface gloo/NCCL use (None: their default, which is right on one host)
    interface: str | None
    #: this rank's address on that interface (None with the default)
    address: str | None
    #: "GLOO_SOCKET_IFNAME" (set by hand), "route to MASTER_ADDR", "route to a peer", or "one host"
    how: str

    def describe(self) -> str:
        target = self.master_host if self.master_host == self.master_ip else f"{self.master_host} ({self.master_ip})"
        iface = "the backend's default (all ranks on one host)" if self.interface is None else \
            f"{self.interface}" + (f" {self.address}" if self.address else "") + f" ({self.how})"
        return f"rendezvous {target}:{self.master_port}, interface {iface}"

    def as_dict(self) -> dict[str, object]:
        return {"master_addr": self.master_host, "master_ip": self.master_ip, "master_port": self.master_port,
                "interface": self.interface, "address": self.address, "how": self.how}


def choose_route(master_host: str, master_port: int, *, exchange: Callable[[str], list[str]],
                 environ: Mapping[str, str] | None = None) -> Route:
    """Find the interface (see the module docstring); `exchange(my_source) -> every rank's source`.

    `exchange` is collective (every rank calls it once, in any case, so nobody waits for a rank
    that skipped it); its answer is only needed on rank 0's node.
    """
    env = os.environ if environ is None else environ
    master_ip = resolve(master_host, master_port)
    source = route_source(master_ip)
    everyone = exchange(source)
    chosen = env.get("GLOO_SOCKET_IFNAME")
    if chosen:
        return Route(master_host, master_port, master_ip, chosen.split(",")[0], None, "GLOO_SOCKET_IFNAME")
    if not is_loopback(source):
        return Route(master_host, master_port, master_ip, interface_of(source), source, "route to MASTER_ADDR")
    remote = [s for s in everyone if not is_loopback(s)]
    if not remote:
        return Route(master_host, master_port, master_ip, None, None, "one host")
    # rank 0's node: the route back to a rank on another node
    mine = route_source(remote[0])
    if is_loopback(mine):
        raise LaunchError(f"MASTER_ADDR={master_host} is a loopback address here but ranks on other hosts reach it "
                          f"from {remote[0]}; set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to this node's interface")
    return Route(master_host, master_port, master_ip, interface_of(mine), mine, "route to a peer")


def export_interface(route: Route, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the chosen interface where they are unset
    (never overriding a user's choice); returns the names it set."""
    env = os.environ if environ is None else environ
    if route.interface is None:
        return []
    set_now = [name for name in IFNAME_VARS if not env.get(name)]
    for name in set_now:
        env[name] = route.interface
    return set_now
