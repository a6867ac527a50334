"""The rank loop: every rank of the world runs it in step; rank 0 decides, the others follow.

Each turn rank 0 takes up to dp_size queued jobs and sends one message to the whole world on the
CPU (gloo) group: a job per dp replica (a round), "idle" (a heartbeat, at least once a second,
so a dead rank is noticed while nothing runs), or "stop". Every replica runs its job with the
loaded session, concurrently with the others; its output rank writes the video and manifest.
The round ends with a gather of the replicas' results on the patient group (a replica that
finishes first waits for the slowest, however long its video takes).

The HTTP process (front.py) never calls a collective: rank 0 asks it for jobs and reports back.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.batch.results import one_line
from launcher.config import RunConfig
from launcher.errors import peer_lost
from launcher.serve.front import Front
from launcher.serve.jobs import Job, interrupted, write_progress
from launcher.serve.metrics import job_stats
from launcher.serve.requests import job_config

#: seconds between heartbeats while the queue is empty (also the latency of picking up a new job)
HEARTBEAT_S = 1.0


@dataclass(slots=True)
class Assignment:
    job_id: str
    config: RunConfig
    seed: int
    job_dir: Path


@dataclass(slots=True)
class Turn:
    """Rank 0's message of one turn; `jobs[r]` is dp replica r's job (None: it idles this round)."""

    kind: str  # "round" | "idle" | "stop"
    jobs: list[Assignment | None] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    job_id: str
    error: str | None = None
    #: stopped at a step boundary (DELETE, or a stop that cannot wait): the step it stopped after
    stopped_at: int | None = None
    steps: int = 0
    #: what the job measured, for /metrics (`metrics.job_stats` of its manifest)
    stats: dict[str, Any] | None = None


class Interrupted(Exception):
    """This replica's job was asked to stop; raised at a step boundary on every rank of the replica."""

    def __init__(self, step: int, steps: int) -> None:
        super().__init__(f"stopped after step {step}/{steps}")
        self.step, self.steps = step, steps


class RankLoop:
    """Runs on every rank's main thread; `store` (the HTTP process's Front) is rank 0's only."""

    def __init__(self, world: Any, session: Any, flags: dict[str, Any], store: Front | None,
                 stop: threading.Event) -> None:
        self.world = world
        self.session = session
        self.flags = flags
        self.store = store
        self.stop = stop
        self.rounds = 0

    def _next_turn(self) -> Turn:
        assert self.store is not None
        if self.stop.is_set():
            return Turn("stop")
        jobs = self.store.take(self.world.dp_size, wait=HEARTBEAT_S)
        if self.stop.is_set():  # SIGTERM while waiting: these jobs have not started
            for job in jobs:
                self.store.requeue(job.id)
            return Turn("stop")
        if not jobs:
            return Turn("idle")
        assignments: list[Assignment | None] = [None] * self.world.dp_size
        for replica, job in enumerate(jobs):
            assignments[replica] = self._assign(job)
        if not any(assignments):
            return Turn("idle")
        return Turn("round", assignments)

    def _assign(self, job: Job) -> Assignment | None:
        assert self.store is not None
        job_dir = self.store.job_dir(job.id)
        try:  # checked at submission; a restart may find the flags or an allowed image changed
            config = job_config(job.request, self.flags, job_dir)
        except Exception as e:  # noqa: BLE001 - any reason fails this job alone, with its message
            self.store.finish(job.id, error=one_line(e))
            return None
        return Assignment(job.id, config, int(job.request["seed"]), job_dir)

    def run(self) -> None:
        """Until rank 0 says stop. A failed collective (dead peer) propagates: the job must end."""
        while True:
            turn = self.world.all_gather_object(self._next_turn() if self.world.rank == 0 else None)[0]
            if turn.kind == "stop":
                return
            if turn.kind == "idle":
                continue
            self.rounds += 1
            mine = turn.jobs[self.world.dp_rank] if self.world.dp_rank < len(turn.jobs) else None
            outcome = self._run_job(mine) if mine is not None else None
            results = self.world.all_gather_object(outcome, patient=True)
            if self.world.rank == 0:
                for result in results:
                    if result is not None:
                        self._report(result)

    def _report(self, result: Outcome) -> None:
        from launcher.outputs.report import log

        assert self.store is not None
        if result.stopped_at is None:
            self.store.finish(result.job_id, error=result.error, stats=result.stats)
            return
        state = self.store.stopped(result.job_id)
        what = "cancelled" if state == "cancelled" else "stopped; queued again (no file written)"
        log(f"job {result.job_id} {what} after step {result.stopped_at}/{result.steps}")

    def _progress(self, job: Assignment) -> Callable[[int, int], None] | None:
        if not self.world.is_output_rank:
            return None
        if self.world.rank == 0:
            store = self.store
            assert store is not None
            return lambda done, total: store.progress(job.job_id, done, total)
        return lambda done, total: write_progress(job.job_dir, done, total)

    def _on_step(self, job: Assignment) -> Callable[[int, int], None]:
        """Progress, then the step-boundary stop: every rank of the replica agrees on the job folder's
        interrupt file (a rank alone might see it one step before the others)."""
        progress = self._progress(job)

        def on_step(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if done < total and self.world.agree_in_replica(interrupted(job.job_dir)):
                raise Interrupted(done, total)

        return on_step

    def _run_job(self, job: Assignment) -> Outcome | None:
        """This replica's job; an Outcome from its output rank (None elsewhere)."""
        from launcher.outputs.atomic import manifest_path_for, write_json
        from launcher.outputs.files import Outputs

        assert job.config.save_file is not None
        try:
            manifest = self.session.generate(job.config, job.seed, Outputs(video=job.config.save_file),
                                             on_step=self._on_step(job))
        except Interrupted as e:  # before any file was written: nothing partial is left
            return Outcome(job.job_id, stopped_at=e.step, steps=e.steps) if self.world.is_output_rank else None
        except Exception as e:
            if peer_lost(e) is not None:
                raise
            # the same bad input fails every rank of the replica alike (an image gone since submission)
            return Outcome(job.job_id, one_line(e)) if self.world.is_output_rank else None
        if manifest is None:
            return None
        manifest["serve"] = {"job": job.job_id, "dp_group": self.world.dp_rank}
        write_json(manifest_path_for(job.config.save_file), manifest)
        return Outcome(job.job_id, stats=job_stats(manifest))
