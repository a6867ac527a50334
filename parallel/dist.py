"""The process group a rank joins, its device, and a teardown that never hangs and never aborts the process.

How the process was launched (torchrun, srun, single) is read by `parallel.launch`; a world of
one never creates a process group, so the single-process path needs no torch.distributed.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from parallel.launch import LaunchEnv, LaunchError, detect_launch
from parallel.netif import Route, choose_route, export_interface, resolve, wait_for_port

log = logging.getLogger(__name__)

DevicePreference = Literal["auto", "cuda", "cpu"]


# --------------------------------------------------------------------------- process group


def _pick_device(env: LaunchEnv, preference: DevicePreference) -> torch.device:
    if preference not in ("auto", "cuda", "cpu"):
        raise LaunchError(f"device preference {preference!r} is not one of auto, cuda, cpu")
    cuda = torch.cuda.is_available()
    if preference == "cuda" and not cuda:
        raise LaunchError("CUDA was requested but torch.cuda.is_available() is False; use the CPU or a CUDA build")
    if preference == "cpu" or not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # Slurm may hide all but this task's GPU (CUDA_VISIBLE_DEVICES per task): wrap around.
    return torch.device("cuda", env.local_rank % count)


def bind_device(device: torch.device, *, set_device: Callable[[torch.device], None] | None = None) -> None:
    """Make `device` this process's current CUDA device (no-op off CUDA): without it a process told
    to use cuda:N still creates a stray context on cuda:0 with its first default-device call."""
    if device.type == "cuda":
        (set_device or torch.cuda.set_device)(device)


def _init_method(env: LaunchEnv) -> str:
    if env.kind == "torchrun":
        return "env://"  # lets torchrun hand over its own TCPStore instead of opening a second one
    host = f"[{env.master_addr}]" if env.master_addr and ":" in env.master_addr else env.master_addr
    return f"tcp://{host}:{env.master_port}"


@dataclass(eq=False)
class DistContext:
    """This rank's place in the job, its device, and the process groups it must tear down.

    `cpu_group` carries CPU tensors (gloo). On CUDA the default group is created with the mixed
    backend "cpu:gloo,cuda:nccl", so the world group itself is the gloo side group: a CPU
    all-reduce never touches the NCCL stream and never forces a GPU sync.
    """

    env: LaunchEnv
    device: torch.device
    #: "gloo", "cpu:gloo,cuda:nccl", or None for a single process
    backend: str | None
    timeout: timedelta
    #: group for CPU-valued agreement over the whole world; None for a single process
    cpu_group: dist.ProcessGroup | None = None
    #: the rendezvous and the interface this rank's collectives bind to; None for a single process
    route: Route | None = None
    _groups: list[weakref.ref] = field(default_factory=list, repr=False)
    _releasers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _closed: bool = field(default=False, repr=False)
    #: how the groups ended: "destroy" (clean exit), "abort" (after a failure), None (still open / one process)
    ended_by: str | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def adopt(self, groups: Iterable[dist.ProcessGroup | None], release: Callable[[], None] | None = None) -> None:
        """Register groups built on top of this context (meshes) and how to drop their references.

        `shutdown` calls `release` so the ProcessGroup objects die while the interpreter is alive;
        see `shutdown` for why that matters.
        """
        if self._closed:
            raise RuntimeError("this DistContext is already shut down; build meshes inside the context")
        self._groups.extend(weakref.ref(g) for g in groups if g is not None)
        if release is not None:
            self._releasers.append(release)

    def shutdown(self, *, clean: bool = True) -> None:
        """Tear down every process group so that no rank aborts at exit; idempotent.

        Cause of the exit abort ("terminate called without an active exception", ~1 run in 5 on
        2-rank gloo jobs, even after destroy_process_group): destroy_process_group only
        *unregisters* groups and calls `shutdown()`, which for gloo does not join its worker
        threads; the ProcessGroupGloo C++ object and its threads live as long as any Python
        reference does. A DeviceMesh keeps one in its `_pg_registry` (a 1-D world mesh even
        reuses the default group), and so does any module global holding a group or mesh. Those
        references are dropped only during interpreter finalization. A gloo worker thread frees
        each finished Work after the caller's wait() has already returned; the Work holds the
        collective's tensors, and freeing a tensor that has a Python object takes the GIL. If
        that happens after Py_FinalizeEx has begun, CPython makes the thread exit
        (pthread_exit) inside take_gil; the forced unwind crosses the noexcept Work destructor
        and libstdc++ calls std::terminate -> SIGABRT (core: ~AsyncAllreduceWork ->
        TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread).

        Fix: (1) on a clean exit, one CPU all-reduce as a barrier, so no rank closes its sockets
        while a peer still needs them; (2) destroy_process_group (after a failure: abort every
        group, which never waits for a peer that may be dead); (3) drop every reference this
        context and the meshes it adopted hold, and collect, so each ProcessGroupGloo destructor
        runs now, while the interpreter is alive: it waits for its queue and joins its workers
        without holding the GIL, and they finish freeing their last Work normally.
        Groups still referenced from elsewhere (a global DeviceMesh or FSDP model) are checked
        again at exit and reported, because they reopen the race.
        Measured on 2-rank torchrun/gloo: plain destroy_process_group with a mesh alive aborted
        7 of 30 runs; with this shutdown 0 of 30, and no gloo thread is left after it
        (tests/parallel_jobs/job_exit.py).
        """
        if self._closed:
            return
        self._closed = True
        if self.backend is None:
            return
        try:
            if clean and dist.is_initialized():
                # A CPU all-reduce rather than dist.barrier(): on a mixed nccl/gloo group barrier()
                # would pick NCCL and the device; this stays on gloo.
                dist.all_reduce(torch.zeros(1), group=self.cpu_group)
        finally:
            if dist.is_initialized():
                # After a failure a peer may be gone: a graceful NCCL destroy can wait on it forever
                # (ncclCommDestroy flushes work the dead peer never matches). Abort every group
                # instead, NCCL and gloo alike, so a survivor exits within --dist-timeout.
                self.ended_by = "destroy" if clean else "abort"
                if clean:
                    dist.destroy_process_group()
                else:
                    from torch.distributed.distributed_c10d import _abort_process_group

                    _abort_process_group()
            for release in reversed(self._releasers):
                release()
            self._releasers.clear()
            self.cpu_group = None
            _clear_dtensor_caches()
            gc.collect()
            _watch_for_survivors(self._groups)
            self._groups = []

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # After an error a peer may never reach the barrier; skip it and let the peer's pending
        # collective fail (connection closed) instead of waiting for the timeout.
        self.shutdown(clean=exc_type is None)


def _clear_dtensor_caches() -> None:
    """DTensor's sharding-propagation caches keep DTensorSpec -> DeviceMesh -> process groups alive
    after an FSDP2 model is gone (every --dit_fsdp run); drop them with the groups."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:  # older/newer torch without the helper: nothing cached we know of
        return
    _clear_sharding_prop_cache()


_survivors: list[weakref.ref] = []


def _alive(refs: Iterable[weakref.ref]) -> list[dist.ProcessGroup]:
    return [g for g in (r() for r in refs) if g is not None]


def _report_survivors() -> None:
    gc.collect()
    alive = _alive(_survivors)
    if alive:
        log.warning("%d process group(s) still referenced at interpreter exit (a DeviceMesh, FSDP module or "
                    "group kept in a global); gloo may abort at exit: drop them before the DistContext ends",
                    len(alive))


def _watch_for_survivors(refs: Iterable[weakref.ref]) -> None:
    """Groups that outlive shutdown are usually locals of the caller that die when it returns;
    check once more at exit (before finalization) and warn only about real leaks."""
    alive = _alive(refs)
    if alive:
        if not _survivors:
            atexit.register(_report_survivors)
        _survivors.extend(weakref.ref(g) for g in alive)


#: NCCL settings for failing fast; a value the user exported wins
NCCL_FAILURE_ENV = {
    # the watchdog tears the process down when a collective errors or passes the group timeout
    # (--dist-timeout) instead of leaving it blocked (torch's default too, made explicit here)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # no flight-recorder dump on timeout: it writes files and delays the exit of every survivor
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}


def nccl_failure_settings() -> dict[str, str]:
    """Export NCCL_FAILURE_ENV where unset (before the NCCL group exists); returns what is in force."""
    for key, value in NCCL_FAILURE_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in NCCL_FAILURE_ENV}


def _store_is_remote(env: LaunchEnv) -> bool:
    """Whether this rank connects to a store someone else hosts (rank 0 of a plain rendezvous hosts it)."""
    return env.rank != 0 or (env.kind == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def _join_store(env: LaunchEnv, limit: timedelta) -> dist.Store:
    """The rendezvous store, after checking in one line that MASTER_ADDR resolves and its port answers.

    Opened here rather than by init_process_group so that a wrong or dead MASTER_ADDR:MASTER_PORT
    is reported as what it is, not as a peer that "stopped answering" while joining.
    """
    host, port = env.master_addr or "", env.master_port or 0
    address = resolve(host, port)
    if _store_is_remote(env):
        wait_for_port(host, address, port, limit.total_seconds())
    store, _, _ = next(dist.rendezvous(_init_method(env), env.rank, env.world_size, timeout=limit))
    store.set_timeout(limit)
    return store


def _route(env: LaunchEnv, store: dist.Store, limit: timedelta) -> Route:
    """Choose the interface (parallel.netif) with one address exchange through the store."""
    prefix = dist.PrefixStore("magcache/route", store)

    def exchange(mine: str) -> list[str]:
        prefix.set(str(env.rank), mine)
        keys = [str(r) for r in range(env.world_size)]
        prefix.wait(keys, limit)
        return [prefix.get(k).decode() for k in keys]

    return choose_route(env.master_addr or "", env.master_port or 0, exchange=exchange)


def init_distributed(
    env: LaunchEnv | None = None,
    *,
    device_preference: DevicePreference = "auto",
    timeout: timedelta | float = 600.0,
) -> DistContext:
    """Join the job's process group (none for a world of one) and pick this rank's device.

    Before the group: the rendezvous store is reached (one-line RendezvousError when MASTER_ADDR
    does not resolve or its port does not answer within `timeout`), and the interface the group
    binds to is chosen and exported (parallel.netif), unless GLOO_SOCKET_IFNAME names one.

    Use as `with init_distributed(detect_launch()) as ctx:` so teardown always runs.
    """
    env = detect_launch() if env is None else env
    limit = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if limit.total_seconds() <= 0:
        raise LaunchError(f"distributed timeout must be positive, got {limit.total_seconds()} s")
    device = _pick_device(env, device_preference)
    if not env.is_distributed:
        return DistContext(env=env, device=device, backend=None, timeout=limit)
    if dist.is_initialized():
        raise LaunchError("torch.distributed is already initialized; call init_distributed once per process")
    if device.type == "cuda":
        bind_device(device)
        nccl_failure_settings()
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    store = _join_store(env, limit)
    route = _route(env, store, limit)
    export_interface(route)
    dist.init_process_group(
        backend=backend,
        store=store,  # torch prefixes it with "default_pg", as it does the store init_method= would open
        rank=env.rank,
        world_size=env.world_size,
        timeout=limit,
        device_id=device if device.type == "cuda" else None,
    )
    ctx = DistContext(env=env, device=device, backend=backend, timeout=limit, cpu_group=dist.group.WORLD,
                      route=route)
    ctx.adopt([dist.group.WORLD])
    return ctx


# --------------------------------------------------------------------------- agreement


def agree_min(group: dist.ProcessGroup | None) -> Callable[[bool], bool]:
    """`agree(flag) -> flag and-ed over the group`: the MagCache "may skip" sync, one tiny collective.

    The group must carry CPU tensors (gloo, or a mixed cpu:gloo group): the decision is a Python
    value, and an NCCL reduce followed by `.item()` would drain the GPU queue on every forward.
    A group of one (or None) needs no communication at all.
    """
    if group is None or dist.get_world_size(group) == 1:
        return bool
    buf = torch.empty(1, dtype=torch.int32)  # reused: the per-call cost is the collective alone
    # A weak reference, so a controller that outlives the context never keeps the group (and its
    # gloo threads) alive into interpreter exit; see DistContext.shutdown.
    group_ref = weakref.ref(group)

    def agree(flag: bool) -> bool:
        pg = group_ref()
        if pg is None:
            raise RuntimeError("agree_min used after its process group was destroyed; sync inside the DistContext")
        buf.fill_(1 if flag else 0)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=pg)
        return bool(buf.item())

    return agree


def reduce_sum(group: dist.ProcessGroup | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`total(t) -> t summed over the group` (a new tensor), for statistics that must be group-global,
    such as MagCache calibration norms over a sharded sequence; a group of one returns `t` itself.

    Uses the group's own backend, so device tensors stay on the device (pass `ParallelMesh.branch_group`).
    """
    if group is None or dist.get_world_size(group) == 1:
        return lambda t: t
    group_ref = weakref.ref(group)  # same reason as agree_min

    def total(t: torch.Tensor) -> torch.Tensor:
        pg = group_ref()
        if pg is None:
            raise RuntimeError("reduce_sum used after its process group was destroyed; reduce inside the DistContext")
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=pg)
        return out

    return total
