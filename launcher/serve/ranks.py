"""The rank loop: every rank of a dp replica runs it in step; each replica takes the next job when free.

Rank 0 holds the job queue (the HTTP process, front.py, over a pipe). For its own replica it takes
the next job on the main thread; for each other replica a dispatcher thread on rank 0 takes one
and sends it to that replica's leader over a gloo group of the two (`World.dispatch_groups`),
then waits for the result. A replica's leader passes each message to its other ranks (a small
gather in the replica): a job, "idle" (a heartbeat each second while the queue is empty, so the
replica's groups never time out and a new job starts within a second) or "stop". A short job
never waits for another replica's long one: there are no rounds.

The HTTP process never calls a collective: rank 0 asks it for jobs and reports back.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import RunConfig
from launcher.errors import one_line, peer_lost
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
    """What a replica does next: run `job`, "idle" (a heartbeat) or "stop"."""

    kind: str  # "job" | "idle" | "stop"
    job: Assignment | None = None


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
        self.jobs_run = 0
        #: rank 0: replica -> its group with that replica's leader; a leader: {its replica: that group}
        self.groups = world.dispatch_groups()
        self.failure: BaseException | None = None

    def _next_turn(self, replica: int) -> Turn:
        """Rank 0: the next queued job for `replica`, else idle or stop."""
        assert self.store is not None
        while True:
            if self.stop.is_set():
                return Turn("stop")
            jobs = self.store.take(1, wait=HEARTBEAT_S, replica=replica)
            if self.stop.is_set():  # SIGTERM while waiting: this job has not started
                for job in jobs:
                    self.store.requeue(job.id)
                return Turn("stop")
            if not jobs:
                return Turn("idle")
            assignment = self._assign(jobs[0])
            if assignment is not None:
                return Turn("job", assignment)

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
        dispatchers = []
        if self.world.rank == 0:
            for replica, group in self.groups.items():
                thread = threading.Thread(target=self._dispatch, args=(replica, group), daemon=True,
                                          name=f"dispatch-{replica}")
                thread.start()
                dispatchers.append(thread)
        self._replica_loop()
        for thread in dispatchers:
            thread.join()
        if self.failure is not None:
            raise self.failure

    def _replica_loop(self) -> None:
        """Every rank of this replica, in step: the leader's turn, then the job if there is one."""
        import torch.distributed as dist

        leader = self.world.rank == self.world.replica_leaders[self.world.dp_rank]
        group = self.groups.get(self.world.dp_rank) if leader and self.world.rank != 0 else None
        while True:
            turn = None
            if self.world.rank == 0:
                turn = self._next_turn(0)
            elif group is not None:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=0, group=group)
                turn = box[0]
            turn = self.world.replica_broadcast(turn)
            if turn.kind == "stop":
                return
            if turn.kind == "idle":
                continue
            outcome = self._run_job(turn.job)
            self.jobs_run += 1
            if self.world.rank == 0:
                if outcome is not None:
                    self._report(outcome)
            elif group is not None:
                dist.send_object_list([outcome], dst=0, group=group)

    def _dispatch(self, replica: int, group: Any) -> None:
        """Rank 0's thread for replica `replica` (>= 1): send it the next job, wait for its result."""
        import torch.distributed as dist

        leader = self.world.replica_leaders[replica]
        try:
            while True:
                turn = self._next_turn(replica)
                dist.send_object_list([turn], dst=leader, group=group)
                if turn.kind == "stop":
                    return
                if turn.kind == "job":
                    box: list[Any] = [None]
                    dist.recv_object_list(box, src=leader, group=group)
                    if box[0] is not None:
                        self._report(box[0])
        except Exception as e:  # noqa: BLE001 - a dead leader: the watchdog ends the server; stop here
            self.failure = self.failure or e
            self.stop.set()

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
