"""`magcache-launch serve`: the models stay loaded, requests queue, every rank in step.

Fixed order, the same on every rank: check the flags (exit 2, nothing loaded) -> inspect the
checkpoint -> the World (spare ranks = dp replicas, as in batch) -> rank 0 binds the HTTP port
(a busy port is one exit 2 on every rank) and starts the HTTP process (`front.py`: the API and
the job store; jobs queue while the models load) -> every rank loads the session -> the rank loop
(`ranks.RankLoop`) until SIGTERM/SIGINT, which stops intake, lets the running jobs finish within
--stop-grace (a second signal: stop them at the next step, kept queued) and exits 0. A failed collective (a dead rank) marks /health unhealthy, fails the running jobs and
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
from launcher.serve.limits import Limits, check_bind

#: after a fatal error, keep answering /health (unhealthy) this long before exiting
UNHEALTHY_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    #: any of these as a bearer token is let in (each a client with its own queue share)
    tokens: tuple[str, ...] = ()
    #: serve a non-loopback address without a token
    insecure: bool = False
    jobs_dir: Path = Path("magcache-jobs")
    max_queue: int = 100
    #: queued + running jobs per client (None: half of max_queue)
    max_queue_per_client: int | None = None
    image_dir: Path | None = None
    limits: Limits = Limits()
    #: seconds SIGTERM waits for the running jobs before stopping them at a step (they stay queued)
    stop_grace: float = 60.0

    @property
    def max_per_client(self) -> int:
        return self.max_queue_per_client if self.max_queue_per_client is not None else max(1, self.max_queue // 2)


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


class _Stopper:
    """SIGTERM/SIGINT on every rank; rank 0 (which holds the front) decides and says what happens.

    First signal: intake stops, the running jobs may finish within --stop-grace seconds, the
    queue is kept. A second signal, or the grace running out: the running jobs stop at their next
    step boundary and go back to the queue. The pipe to the HTTP process is used from a helper
    thread: the handler runs on the main thread, which may be in the middle of a call (holding it).
    """

    def __init__(self, stop: threading.Event, front: Any, grace: float) -> None:
        self.stop = stop
        self.front = front
        self.grace = grace
        self.signals = 0
        self._ended = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        self.stop.set()
        if self.front is None:
            return
        target = self._first if self.signals == 1 else self._now
        threading.Thread(target=target, args=(signal.Signals(signum).name,), daemon=True).start()

    def _first(self, name: str) -> None:
        from launcher.outputs.report import log

        with contextlib.suppress(Exception):  # the HTTP process may be what failed
            self.front.set_health("stopping")
            running, counts = self.front.running(), self.front.counts()
            key = "Ctrl-C" if name == "SIGINT" else name
            if not running:
                log(f"stopping ({name}): no job running, {counts['queued']} queued kept")
                return
            log(f"stopping ({name}): finishing job {', '.join(running)} (up to --stop-grace {self.grace:g} s), "
                f"{counts['queued']} queued kept; {key} again to stop now")
            if not self._ended.wait(self.grace):
                self._now(f"--stop-grace {self.grace:g} s passed")

    def _now(self, why: str) -> None:
        from launcher.outputs.report import log

        if self._ended.is_set():
            return
        with contextlib.suppress(Exception):
            stopping = self.front.interrupt_running()
            if stopping:
                log(f"stopping now ({why}): job {', '.join(stopping)} stops at its next step and stays queued")

    def ended(self) -> None:
        """The rank loop returned: nothing left to interrupt."""
        self._ended.set()


def run_serve(options: ServeOptions, flags: dict[str, Any]) -> int:
    from launcher.engine.lifecycle import check_inputs, open_engine, probe_config

    if options.max_queue < 1:
        raise UsageError(f"--max-queue {options.max_queue}: must be >= 1")
    for flag, value in (("--max-queue-per-client", options.max_per_client), ("--max-frames", options.limits.max_frames),
                        ("--max-steps", options.limits.max_steps), ("--max-pixels", options.limits.max_pixels),
                        ("--max-image-pixels", options.limits.max_image_pixels),
                        ("--max-body-mb", options.limits.max_body_mb)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    if options.limits.body_timeout_s <= 0:
        raise UsageError(f"--body-timeout {options.limits.body_timeout_s:g}: must be > 0 seconds")
    if options.stop_grace < 0:
        raise UsageError(f"--stop-grace {options.stop_grace:g}: must be >= 0 seconds")
    refused = check_bind(options.host, options.tokens, options.insecure)
    if refused is not None:
        raise UsageError(refused)
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
        _log_resumed(front.resumed, log)
    fatal = _Fatal(world.rank, front)
    stopper = _Stopper(stop, front, options.stop_grace)
    stopper.install()
    watchdog = Watchdog(world.side_group(), lambda e: fatal(e, exit_now=True)).start()
    try:
        session = engine.session()
        engine.at("while serving")
        if front is not None:
            front.set_health("stopping" if stop.is_set() else "ready")
            log(f"serving on {url} ({world.world_size} rank(s), {world.dp_size} dp replica(s))")
        RankLoop(world, session, flags, front, stop).run()
        stopper.ended()
        watchdog.stop()
        queued = front.counts()["queued"] if front is not None else 0
    except Exception as e:
        fatal(e, exit_now=False)
        raise
    finally:
        if front is not None:
            front.close()
    if world.rank == 0:
        log(f"stopped: {queued} queued job(s) kept in {options.jobs_dir} for the next start")
    return 0


def _log_resumed(resumed: dict[str, list[str]], log: Any, shown: int = 10) -> None:
    """What a restart picks up: the queued jobs, oldest first, marking those that had been running."""
    queued = resumed["queued"]
    if not queued:
        return
    was_running = set(resumed["was_running"])
    names = [f"{j} (was running)" if j in was_running else j for j in queued[:shown]]
    more = f" and {len(queued) - shown} more" if len(queued) > shown else ""
    log(f"resuming {len(queued)} queued job(s) from the last run: {', '.join(names)}{more}")


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
