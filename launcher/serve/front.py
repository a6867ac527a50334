"""The HTTP front end runs in a process of its own, beside rank 0; rank 0 talks to it over a pipe.

Why a process and not a thread: the rank loop is Python that dispatches every torch op, and
Python runs one thread at a time (the GIL). An HTTP thread answering 50 polls a second took
the GIL from the denoise often enough to show in its time on a busy CPU. In its own process
the API (uvicorn + Starlette), the JobStore and /health never touch the ranks' interpreter:
rank 0 only makes a few small calls (take jobs, report a step, finish) over a socketpair.

The front owns the jobs folder. It exits when rank 0 closes the pipe (or dies: end of file),
and ignores SIGINT/SIGTERM (a Ctrl-C reaches the whole process group), which are rank 0's to
act on (stop intake, finish, exit 0). It runs at nice 10: where CPUs are short, the ranks first.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from launcher.serve.jobs import Job


#: seconds between looks at the queue while a replica is free
TAKE_POLL_S = 0.05


class FrontGone(RuntimeError):
    """The HTTP process died or closed its end of the pipe."""


class Front:
    """Rank 0's handle on the HTTP process: the JobStore and /health calls the rank loop needs."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, jobs_dir: Path, resumed: dict[str, list[str]]) -> None:
        self.proc = proc
        self.conn = conn
        self.root = Path(jobs_dir)
        #: the queue found on disk at start: {"queued": ids oldest first, "was_running": ids}
        self.resumed = resumed
        self._lock = threading.Lock()  # main thread, watchdog and signal helper threads share the pipe

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            try:
                self.conn.send((method, args))
                ok, value = self.conn.recv()
            except (EOFError, OSError) as e:
                raise FrontGone(f"the HTTP process is gone ({e or 'end of file'})") from None
        if not ok:
            raise RuntimeError(f"HTTP process, {method}: {value}")
        return value

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def take(self, n: int, *, wait: float, replica: int = 0) -> list[Job]:
        """Up to `n` queued jobs for `replica`, waiting up to `wait` s. Polled from this side: a call
        holds the pipe, which rank 0's other threads (dispatchers, progress) share."""
        deadline = time.monotonic() + wait
        while True:
            jobs = self._call("take", n, 0, replica)
            if jobs or time.monotonic() >= deadline:
                return jobs
            time.sleep(TAKE_POLL_S)

    def progress(self, job_id: str, step: int, steps: int) -> None:
        self._call("progress", job_id, step, steps)

    def finish(self, job_id: str, *, error: str | None, stats: dict[str, Any] | None = None) -> None:
        """The job ended; `stats` (what it measured) go to /metrics."""
        self._call("finish", job_id, error, stats)

    def requeue(self, job_id: str) -> None:
        self._call("requeue", job_id)

    def stopped(self, job_id: str) -> str:
        """A job its replica stopped at a step: cancelled (DELETE) or queued again; the new state."""
        return self._call("stopped", job_id)

    def interrupt_running(self) -> list[str]:
        """Ask every running job to stop at its next step (they go back to the queue)."""
        return self._call("interrupt_running")

    def running(self) -> list[str]:
        return self._call("running")

    def counts(self) -> dict[str, int]:
        return self._call("counts")

    def fail_running(self, message: str) -> list[str]:
        return self._call("fail_running", message)

    def set_health(self, state: str, error: str | None = None) -> None:
        self._call("set_health", state, error)

    def close(self, timeout: float = 10) -> None:
        """Stop the HTTP process (it answers until here) and wait for it."""
        try:
            self._call("close")
        except (FrontGone, RuntimeError):
            pass
        self.conn.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_front(sock: socket.socket, options: Any, flags: dict[str, Any], health: dict[str, Any]) -> Front:
    """Spawn the HTTP process on the bound socket; returns once it answers requests."""
    ours, theirs = socket.socketpair()
    cmd = [sys.executable, "-m", "launcher.serve.front", str(theirs.fileno()), str(sock.fileno())]
    # same session as rank 0: with Linux's autogroup scheduling a new session would be a new
    # group with a full CPU share of its own, and the front's nice 10 would not yield to the rank
    proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(), sock.fileno()))
    theirs.close()
    sock.close()  # the front accepts on its copy
    conn = Connection(ours.detach())
    conn.send((options, flags, health))
    if not conn.poll(120):
        proc.kill()
        raise RuntimeError("the HTTP process did not start within 120 s")
    try:
        kind, resumed = conn.recv()
    except EOFError:
        raise RuntimeError(f"the HTTP process exited ({proc.wait()}) before serving") from None
    assert kind == "ready"
    return Front(proc, conn, options.jobs_dir, resumed)


# -- the HTTP process ---------------------------------------------------------------------------
def _serve(conn: Connection, listen_fd: int) -> None:
    import uvicorn

    from launcher.outputs.atomic import write_json
    from launcher.serve.app import Health, create_app
    from launcher.serve.jobs import JobStore
    from launcher.serve.metrics import Metrics
    from launcher.serve.requests import ServeSettings

    options, flags, health_init = conn.recv()
    store = JobStore(options.jobs_dir, max_queue=options.max_queue, max_per_client=options.max_per_client)
    health = Health(**health_init)
    settings = ServeSettings(flags=flags, image_dir=options.image_dir, limits=options.limits)
    metrics = Metrics(store, replicas=health.dp, started=health.started)
    app = create_app(store, settings, health, tokens=options.tokens, metrics=metrics)
    sock = socket.socket(fileno=listen_fd)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    # on a thread: uvicorn then leaves signals alone (ours are ignored; rank 0 decides when to stop)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    write_json(Path(options.jobs_dir) / "server.json", {"url": url, "pid": os.getppid(), "http_pid": os.getpid(),
                                                        "world": health.world})
    conn.send(("ready", {"queued": store.resumed, "was_running": sorted(store.was_running)}))
    never = threading.Event()

    def set_health(state: str, error: str | None) -> None:
        if health.state == "unhealthy" and state != "unhealthy":
            return  # a lost rank is final: a stop signal arriving after it (torchrun's) does not hide it
        health.state, health.error = state, error

    def finish(job_id: str, error: str | None, stats: dict[str, Any] | None) -> None:
        store.finish(job_id, error=error)
        metrics.job_finished(stats)

    calls = {"take": lambda n, wait, replica: store.take(n, wait=wait, stop=never, replica=replica), "progress": store.progress,
             "finish": finish, "requeue": store.requeue,
             "fail_running": store.fail_running, "set_health": set_health, "stopped": store.stopped,
             "interrupt_running": store.interrupt_running, "running": store.running, "counts": store.counts}
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break  # rank 0 is gone
        if method == "close":
            conn.send((True, None))
            break
        try:
            conn.send((True, calls[method](*args)))
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which decides
            conn.send((False, f"{type(e).__name__}: {e}"))
    server.should_exit = True
    thread.join(timeout=5)


def main(argv: list[str]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # the ranks come first: where CPUs are short, the scheduler serves a poll only after them
    os.nice(10)
    _serve(Connection(int(argv[0])), int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
