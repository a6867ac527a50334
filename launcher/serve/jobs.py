"""Jobs on disk: one folder per job, every file written atomically, so a restart resumes the queue.

    JOBS_DIR/<id>/request.json   the validated request (seed already drawn: a rerun is the same video)
    JOBS_DIR/<id>/state.json     state, timings, error, dp replica; rewritten on each transition
    JOBS_DIR/<id>/video.mp4      the video, and video.json its manifest (written by the output rank)
    JOBS_DIR/<id>/progress.json  denoise step, written by the output rank of a replica other than rank 0's
    JOBS_DIR/<id>/image.*        an uploaded first frame
    JOBS_DIR/<id>/interrupt.json {"reason": "cancel" | "requeue"}: its replica stops at the next step

A job folder appears whole: it is built under `.staging/` and renamed into place. Only the HTTP
process (`front.py`) holds the store (rank 0 asks it over a pipe); the lock makes each
transition one step among its request threads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.outputs.atomic import write_json

STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = frozenset({"done", "failed", "cancelled"})
_ID = re.compile(r"^[0-9]{20}-[0-9a-f]{8}$")


class QueueFull(Exception):
    """More than --max-queue jobs waiting: the client should retry later (HTTP 429)."""


class NotCancellable(Exception):
    """DELETE of a job that already ended (HTTP 409)."""


class ClientShareFull(QueueFull):
    """One client holds its share of the queue (HTTP 429)."""


#: the file in a running job's folder that stops it at the next step boundary (its text: the reason)
INTERRUPT = "interrupt.json"


@dataclass(slots=True)
class Job:
    id: str
    request: dict[str, Any]
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    replica: int | None = None
    #: who submitted it (a token's hash, or an address): the per-client queue share counts these
    client: str | None = None
    #: denoise progress, kept in memory (progress.json for other replicas); not part of state.json
    step: int = 0
    steps: int = 0

    cancelling: bool = False

    def public(self) -> dict[str, Any]:
        """What `GET /jobs/{id}` answers."""
        out = {"id": self.id, "state": self.state, "progress": {"step": self.step, "steps": self.steps},
               "error": self.error, "created": self.created, "started": self.started, "finished": self.finished,
               "replica": self.replica, "prompt": self.request.get("prompt"), "seed": self.request.get("seed")}
        if self.cancelling:
            out["cancelling"] = True
        return out

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("request", "step", "steps", "cancelling"):
            d.pop(key)
        return d


def new_job_id() -> str:
    """Sortable by submission time to the microsecond (restart keeps the queue order), unique
    without coordination (the random tail); the queue itself is ordered by `created`, then id."""
    now = time.time()
    return f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}{int(now % 1 * 1e6):06d}-{uuid.uuid4().hex[:8]}"


def _order(job: Job) -> tuple[float, str]:
    return job.created, job.id


def is_job_id(text: str) -> bool:
    return bool(_ID.match(text))


class JobStore:
    """The queue and every job's state, in memory and mirrored to JOBS_DIR."""

    def __init__(self, root: Path, *, max_queue: int, max_per_client: int | None = None) -> None:
        self.root = Path(root)
        self.max_queue = max_queue
        self.max_per_client = max_per_client
        #: the queued jobs found at start, oldest first, and which of them were running then
        self.resumed: list[str] = []
        self.was_running: set[str] = set()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self.root.mkdir(parents=True, exist_ok=True)
        self.requeued = self._load()
        self.resumed = [j.id for j in sorted(self._jobs.values(), key=_order) if j.state == "queued"]

    # -- disk ---------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def video_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "video.mp4"

    def _save(self, job: Job) -> None:
        write_json(self.job_dir(job.id) / "state.json", job.record())

    def _load(self) -> int:
        """Read every job; one that was running when the server died goes back to the queue."""
        shutil.rmtree(self.root / ".staging", ignore_errors=True)
        requeued = 0
        for folder in sorted(self.root.iterdir()):
            if not is_job_id(folder.name) or not (folder / "state.json").is_file():
                continue
            request = json.loads((folder / "request.json").read_text())
            state = json.loads((folder / "state.json").read_text())
            job = Job(id=folder.name, request=request, **{k: state.get(k) for k in
                                                          ("state", "created", "started", "finished", "error", "replica",
                                                           "client")})
            marker = folder / INTERRUPT
            if job.state == "running" and marker.is_file() and json.loads(marker.read_text())["reason"] == "cancel":
                job.state, job.finished = "cancelled", time.time()
                self._save(job)
            elif job.state == "running":
                job.state, job.started, job.replica = "queued", None, None
                self._save(job)
                self.was_running.add(job.id)
                requeued += 1
            if job.state != "running":
                marker.unlink(missing_ok=True)
                (folder / "progress.json").unlink(missing_ok=True)
            if job.state == "done":
                job.step = job.steps = int(request.get("sample_steps") or 0)
            self._jobs[job.id] = job
        return requeued

    # -- HTTP side ----------------------------------------------------------------------------
    def stage(self) -> Path:
        """A fresh folder for a request being validated (removed unless `add` adopts it)."""
        path = self.root / ".staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def add(self, job_id: str, request: dict[str, Any], staged: Path, client: str | None = None) -> Job:
        """Queue a validated request whose files sit in `staged`; QueueFull when the queue is full
        or `client` already holds its share (queued + running) of it."""
        with self._lock:
            self.check_room(client)
            job = Job(id=job_id, request=request, client=client)
            write_json(staged / "request.json", request)
            write_json(staged / "state.json", job.record())
            os.replace(staged, self.job_dir(job_id))
            self._jobs[job_id] = job
            self._lock.notify_all()
            return job

    def check_room(self, client: str | None) -> None:
        """QueueFull unless the queue, and this client's share of it, has room (cheap: checked again
        before a request is validated, so a flood of refused requests costs no validation)."""
        with self._lock:
            if sum(j.state == "queued" for j in self._jobs.values()) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); retry later")
            if self.max_per_client is not None and client is not None and sum(
                    j.client == client and j.state in ("queued", "running") for j in self._jobs.values()
            ) >= self.max_per_client:
                raise ClientShareFull(f"you have {self.max_per_client} jobs queued or running, this server's "
                                      "--max-queue-per-client; retry when one ends")

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state == "running" and job.replica not in (None, 0):
                self._read_remote_progress(job)
            return job

    def _read_remote_progress(self, job: Job) -> None:
        try:
            p = json.loads((self.job_dir(job.id) / "progress.json").read_text())
            job.step, job.steps = int(p["step"]), int(p["steps"])
        except (OSError, ValueError, KeyError):
            pass  # not written yet

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=_order)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {s: sum(j.state == s for j in self._jobs.values()) for s in STATES}

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled now; a running one is asked to stop at its next step
        (`cancelling`), and is cancelled when its replica reports back."""
        with self._lock:
            job = self._jobs[job_id]
            if job.state in TERMINAL:
                raise NotCancellable(f"job {job_id} is {job.state}; only a queued or running job can be cancelled")
            if job.state == "running":
                write_json(self.job_dir(job_id) / INTERRUPT, {"reason": "cancel"})
                job.cancelling = True
                return job
            job.state, job.finished = "cancelled", time.time()
            self._save(job)
            return job

    def remove(self, job_id: str) -> None:
        """Forget a queued or ended job and delete its folder (the OpenAI API's DELETE)."""
        with self._lock:
            job = self._jobs[job_id]
            if job.state == "running":
                raise NotCancellable(f"job {job_id} is running; cancel it first")
            del self._jobs[job_id]
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def interrupt_running(self) -> list[str]:
        """Every running job stops at its next step and goes back to the queue (a stop that cannot wait)."""
        with self._lock:
            running = [j for j in self._jobs.values() if j.state == "running"]
            for job in running:
                if not job.cancelling:
                    write_json(self.job_dir(job.id) / INTERRUPT, {"reason": "requeue"})
            return [j.id for j in running]

    def busy_seconds(self, *, since: float, now: float) -> dict[int, float]:
        """Per dp replica, the seconds since `since` it spent running jobs (the running ones up to `now`)."""
        busy: dict[int, float] = {}
        with self._lock:
            for job in self._jobs.values():
                if job.replica is None or job.started is None or job.started < since:
                    continue
                end = now if job.state == "running" else job.finished
                if end is not None:
                    busy[job.replica] = busy.get(job.replica, 0.0) + max(0.0, end - job.started)
        return busy

    def running(self) -> list[str]:
        with self._lock:
            return [j.id for j in sorted(self._jobs.values(), key=_order) if j.state == "running"]

    # -- rank-loop side -----------------------------------------------------------------------
    def take(self, n: int, *, wait: float, stop: threading.Event | None = None, replica: int = 0) -> list[Job]:
        """Up to `n` queued jobs, oldest first, marked running on dp replicas `replica`, `replica` + 1, ...;
        waits up to `wait` s for the first."""
        with self._lock:
            deadline = time.monotonic() + wait
            while stop is None or not stop.is_set():
                queued = sorted((j for j in self._jobs.values() if j.state == "queued"), key=_order)
                if queued:
                    taken = queued[:n]
                    for offset, job in enumerate(taken):
                        job.state, job.started, job.replica = "running", time.time(), replica + offset
                        job.step, job.steps = 0, int(job.request.get("sample_steps") or 0)
                        self._save(job)
                    return taken
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.25))
            return []

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def progress(self, job_id: str, step: int, steps: int) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.step, job.steps = step, steps

    def finish(self, job_id: str, *, error: str | None, cancelled: bool = False) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.state = "cancelled" if cancelled else "failed" if error else "done"
            job.error, job.finished, job.cancelling = error, time.time(), False
            if job.state == "done":
                job.step = job.steps
            self._save(job)
            self._clear(job)

    def requeue(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.state, job.started, job.replica, job.step, job.cancelling = "queued", None, None, 0, False
            self._save(job)
            self._clear(job)

    def stopped(self, job_id: str) -> str:
        """Its replica stopped it at a step: cancelled if DELETE asked, else queued again. The new state."""
        with self._lock:
            if self._jobs[job_id].cancelling:
                self.finish(job_id, error="cancelled while running", cancelled=True)
            else:
                self.requeue(job_id)
            return self._jobs[job_id].state

    def _clear(self, job: Job) -> None:
        """No stop request or progress of a run that ended lingers into the next one."""
        (self.job_dir(job.id) / INTERRUPT).unlink(missing_ok=True)
        (self.job_dir(job.id) / "progress.json").unlink(missing_ok=True)

    def fail_running(self, message: str) -> list[str]:
        """Every running job fails with `message` (a rank died under them)."""
        with self._lock:
            running = [j.id for j in self._jobs.values() if j.state == "running"]
        for job_id in running:
            self.finish(job_id, error=message)
        return running


def interrupted(job_dir: Path) -> bool:
    """Whether this job was asked to stop (a ranks-side check at each step boundary)."""
    return (Path(job_dir) / INTERRUPT).is_file()


def write_progress(job_dir: Path, step: int, steps: int) -> None:
    """The output rank of another replica reports its step through the (shared) jobs folder."""
    write_json(Path(job_dir) / "progress.json", {"step": step, "steps": steps})
