"""`magcache-launch serve`: the models stay loaded, requests queue, every rank in step.

Fixed order, the same on every rank: check the flags (exit 2, nothing loaded) -> inspect the
checkpoint -> the World (spare ranks = dp replicas, as in batch) -> rank 0 opens the job store
and binds the HTTP port (a busy port is one exit 2 on every rank) -> the HTTP thread starts
(jobs queue while the models load) -> every rank loads the session -> the rank loop
(`ranks.RankLoop`) until SIGTERM/SIGINT, which stops intake, lets the running round finish and
exits 0. A failed collective (a dead rank) marks /health unhealthy, fails the running jobs and
exits 1 within --dist-timeout; queued jobs stay on disk for the next start.
"""
from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import UsageError, check_output_location
from launcher.errors import peer_lost

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


def _install_stop(stop: threading.Event, on_stop: Any) -> None:
    """SIGTERM/SIGINT: stop accepting and end after the running round (every rank; rank 0 decides)."""
    def handler(signum: int, _frame: Any) -> None:
        stop.set()
        on_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def run_serve(options: ServeOptions, flags: dict[str, Any]) -> int:
    from launcher.batch import probe_config
    from launcher.checkpoint import inspect_checkpoint
    from launcher.engine.world import open_world

    if options.max_queue < 1:
        raise UsageError(f"--max-queue {options.max_queue}: must be >= 1")
    if options.image_dir is not None and not options.image_dir.is_dir():
        raise UsageError(f"--image-dir {options.image_dir}: directory not found")
    check_output_location(options.jobs_dir, "--jobs-dir", directory=True)
    base = probe_config(flags)
    info = inspect_checkpoint(base.ckpt_dir, base.task)
    stop = threading.Event()
    with open_world(base, num_heads=info.num_heads, allow_data_parallel=True) as world:
        return _serve_on(world, base, info, options, flags, stop)


def _serve_on(world: Any, base: Any, info: Any, options: ServeOptions, flags: dict[str, Any],
              stop: threading.Event) -> int:
    from launcher.engine.session import GenerationSession
    from launcher.outputs.report import log
    from launcher.serve.app import Health
    from launcher.serve.ranks import RankLoop
    from launcher.serve.watchdog import Watchdog

    sock = _bind(options.host, options.port) if world.rank == 0 else None
    problem = world.all_gather_object(sock if isinstance(sock, str) else None)[0]
    if problem is not None:
        raise UsageError(problem)
    pids = [p for p in world.all_gather_object(_pid())]
    health = Health(world=world.world_size, dp=world.dp_size, pids=pids)
    store = server = None
    if world.rank == 0:
        assert isinstance(sock, socket.socket)
        store, server = _start_http(sock, options, flags, health)
    _install_stop(stop, lambda: _stopping(health, store))
    watchdog = Watchdog(world.side_group(), lambda e: _fatal(e, world.rank, health, store, exit_now=True)).start()
    try:
        session = GenerationSession(base, info, world)
        health.state = "stopping" if stop.is_set() else "ready"
        if world.rank == 0:
            log(f"serving on {_url(sock)} ({world.world_size} rank(s), {world.dp_size} dp replica(s))")
        RankLoop(world, session, flags, store, stop).run()
        watchdog.stop()
    except Exception as e:
        _fatal(e, world.rank, health, store, exit_now=False)
        raise
    finally:
        if server is not None:
            server.should_exit = True
    if world.rank == 0:
        log("stopped: the running jobs finished; queued jobs stay in the jobs folder")
    return 0


_fatal_lock = threading.Lock()


def _fatal(exc: BaseException, rank: int, health: Any, store: Any, *, exit_now: bool) -> None:
    """A rank died (or the loop failed): /health unhealthy, running jobs failed, then exit 1.

    `exit_now` (from the watchdog thread, while the main thread may be deep in a denoise that no
    longer has peers): end the process here with os._exit, after the grace period.
    """
    import os
    import sys

    lost = peer_lost(exc, "while serving")
    message = str(lost) if lost is not None else f"the server failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    with _fatal_lock:
        if store is not None and health.state != "unhealthy":
            health.state, health.error = "unhealthy", message
            store.fail_running(message)
            time.sleep(UNHEALTHY_GRACE_S)
        if exit_now:
            print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
            os._exit(1)


def _pid() -> int:
    import os

    return os.getpid()


def _url(sock: socket.socket | str | None) -> str:
    assert isinstance(sock, socket.socket)
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _stopping(health: Any, store: Any) -> None:
    if health.state != "unhealthy":
        health.state = "stopping"
    if store is not None:
        store.wake()


def _start_http(sock: socket.socket, options: ServeOptions, flags: dict[str, Any], health: Any):
    """Rank 0: the job store and uvicorn on a daemon thread (uvicorn leaves signals to us there)."""
    import uvicorn

    from launcher.outputs.atomic import write_json
    from launcher.outputs.report import log
    from launcher.serve.app import create_app
    from launcher.serve.jobs import JobStore
    from launcher.serve.requests import ServeSettings

    store = JobStore(options.jobs_dir, max_queue=options.max_queue)
    if store.requeued:
        log(f"{store.requeued} job(s) that were running when the server stopped are queued again")
    settings = ServeSettings(flags=flags, image_dir=options.image_dir)
    app = create_app(store, settings, health, token=options.token)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    write_json(Path(options.jobs_dir) / "server.json", {"url": _url(sock), "pid": _pid(), "world": health.world})
    return store, server
