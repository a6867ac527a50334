"""`magcache-launch serve`: the models stay loaded, requests queue, every rank in step.

Fixed order, the same on every rank: check the flags (exit 2, nothing loaded) -> inspect the
checkpoint -> the World (spare ranks = dp replicas, as in batch) -> rank 0 binds the HTTP port
(a busy port is one exit 2 on every rank) and starts the HTTP process (`front.py`: the API and
the job store; jobs queue while the models load) -> every rank loads the session -> the rank loop
(`ranks.RankLoop`) until SIGTERM/SIGINT, which stops intake, lets the running round finish and
exits 0. A failed collective (a dead rank) marks /health unhealthy, fails the running jobs and
exits 1 within --dist-timeout; queued jobs stay on disk for the next start.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import check_output_location
from launcher.errors import UsageError, peer_lost

#: after a fatal error, keep answering /health (unhealthy) this long before exiting
UNHEALTHY_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    jobs_dir: Path = Path("magcache-jobs")
    max_queue: int = 100
    image_dir: Path | None = None


def _bind(host: str, port: int) -> socket.socket | str:
    """The listening socket, or why not (a message every rank prints alike)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    except OSError as e:
        return f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another port"


def _install_stop(stop: threading.Event, front: Any) -> None:
    """SIGTERM/SIGINT: stop accepting and end after the running round (every rank; rank 0 decides).

    The HTTP process is told from a helper thread: the handler runs on the main thread, which
    may be in the middle of a call to it (holding the pipe).
    """
    def handler(signum: int, _frame: Any) -> None:
        stop.set()
        if front is not None:
            threading.Thread(target=_tell_stopping, args=(front,), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _tell_stopping(front: Any) -> None:
    with contextlib.suppress(Exception):
        front.set_health("stopping")


def run_serve(options: ServeOptions, flags: dict[str, Any]) -> int:
    from launcher.engine.lifecycle import check_inputs, open_engine, probe_config

    if options.max_queue < 1:
        raise UsageError(f"--max-queue {options.max_queue}: must be >= 1")
    if options.image_dir is not None and not options.image_dir.is_dir():
        raise UsageError(f"--image-dir {options.image_dir}: directory not found")
    check_output_location(options.jobs_dir, "--jobs-dir", directory=True)
    base = probe_config(flags)
    inputs = check_inputs(base)
    stop = threading.Event()
    with open_engine(base, data_parallel=True, inputs=inputs) as engine:
        return _serve_on(engine, options, flags, stop)


def _serve_on(engine: Any, options: ServeOptions, flags: dict[str, Any], stop: threading.Event) -> int:
    from launcher.outputs.report import log
    from launcher.serve.front import start_front
    from launcher.serve.ranks import RankLoop
    from launcher.serve.watchdog import Watchdog

    world = engine.world
    sock = _bind(options.host, options.port) if world.rank == 0 else None
    problem = world.all_gather_object(sock if isinstance(sock, str) else None)[0]
    if problem is not None:
        raise UsageError(problem)
    pids = list(world.all_gather_object(os.getpid()))
    front = None
    if world.rank == 0:
        assert isinstance(sock, socket.socket)
        url = _url(sock)
        front = start_front(sock, options, flags, {"world": world.world_size, "dp": world.dp_size, "pids": pids})
        if front.requeued:
            log(f"{front.requeued} job(s) that were running when the server stopped are queued again")
    fatal = _Fatal(world.rank, front)
    _install_stop(stop, front)
    watchdog = Watchdog(world.side_group(), lambda e: fatal(e, exit_now=True)).start()
    try:
        session = engine.session()
        engine.at("while serving")
        if front is not None:
            front.set_health("stopping" if stop.is_set() else "ready")
            log(f"serving on {url} ({world.world_size} rank(s), {world.dp_size} dp replica(s))")
        RankLoop(world, session, flags, front, stop).run()
        watchdog.stop()
    except Exception as e:
        fatal(e, exit_now=False)
        raise
    finally:
        if front is not None:
            front.close()
    if world.rank == 0:
        log("stopped: the running jobs finished; queued jobs stay in the jobs folder")
    return 0


class _Fatal:
    """A rank died (or the loop failed): /health unhealthy, running jobs failed, then exit 1.

    `exit_now` (from the watchdog thread, while the main thread may be deep in a denoise that no
    longer has peers): end the process here with os._exit, after the grace period.
    """

    def __init__(self, rank: int, front: Any) -> None:
        self.rank = rank
        self.front = front
        self._lock = threading.Lock()
        self._reported = False

    def __call__(self, exc: BaseException, *, exit_now: bool) -> None:
        import sys

        lost = peer_lost(exc, "while serving")
        text = str(exc).splitlines()[0] if str(exc) else repr(exc)
        message = str(lost) if lost is not None else f"the server failed: {text}"
        with self._lock:
            if self.front is not None and not self._reported:
                self._reported = True
                with contextlib.suppress(Exception):  # the HTTP process may be what failed
                    self.front.set_health("unhealthy", message)
                    self.front.fail_running(message)
                    time.sleep(UNHEALTHY_GRACE_S)
            if exit_now:
                print(f"error: rank {self.rank}: {message}", file=sys.stderr, flush=True)
                if self.front is not None:
                    self.front.proc.kill()
                os._exit(1)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
