"""The process-level runtime of a run: launch environment, process groups, mesh, placement.

Everything rank-related that the session needs is here, behind a few methods, so the session
and pipeline never compute ranks or call collectives themselves. Ranks and groups come from
`parallel/` (ParallelDims/ParallelMesh); this module only wires them to the Wan pipeline.
"""
from __future__ import annotations

import contextlib
import resource
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from launcher.config import RunConfig, UsageError
from launcher.dit import LocalSequence, SequenceSharding
from launcher.models import Placement, placement_for
from launcher.pipeline import BranchExchange, SerialBranches

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from parallel.dist import DistContext
    from parallel.mesh import ParallelMesh


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak host RSS (and CUDA allocations) of this process so far, in MiB."""
    out = {"host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


class UlyssesSequence:
    """The sequence split over one branch's sp group, attention through Ulysses all-to-all."""

    def __init__(self, group: "dist.ProcessGroup", rank: int, size: int) -> None:
        self.group = group
        self.rank = rank
        self.size = size

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        from parallel.ulysses import split_sequence

        return split_sequence(x, dim, self.group)[0]

    def gather(self, x: torch.Tensor, dim: int, valid_len: int) -> torch.Tensor:
        from parallel.ulysses import gather_sequence

        return gather_sequence(x, dim, self.group, valid_len)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        from parallel.ulysses import ulysses_attention

        return ulysses_attention(q, k, v, self.group, valid_len=valid_len, backend="auto")

    def local_valid(self, valid_len: int) -> int:
        chunk = -(-valid_len // self.size)
        return max(0, min(chunk, valid_len - self.rank * chunk))


class CfgParallelBranches:
    """This rank computes one branch; the pair swaps predictions once per step."""

    def __init__(self, group: "dist.ProcessGroup", branch: int) -> None:
        self.group = group
        self.branches = (branch,)

    def combine(self, preds: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from parallel.cfg import exchange_predictions

        (local,) = preds.values()
        return exchange_predictions(local, self.group)


@dataclass
class Runtime:
    placement: Placement
    rank: int = 0
    world_size: int = 1
    launch_kind: str = "single"
    sharding: SequenceSharding = field(default_factory=LocalSequence)
    exchange: BranchExchange = field(default_factory=SerialBranches)
    #: FSDP2 over the sp group: shards the given modules in place (None: no sharding)
    fsdp_mesh: "DeviceMesh | None" = None
    #: MagCache agreement among the ranks computing one branch (None: single process)
    sync: Callable[[bool], bool] | None = None
    #: SUM over the sequence group, for calibration statistics (None: single process)
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: writes this replica's outputs (rank 0 of each dp group)
    is_output_rank: bool = True
    decodes: bool = True
    mesh: dict[str, int] = field(default_factory=lambda: {"dp": 1, "cfg": 1, "sp": 1})
    #: this rank's data-parallel group (batch items are spread over groups) and their count
    dp_rank: int = 0
    dp_size: int = 1
    ctx: "DistContext | None" = None
    pmesh: "ParallelMesh | None" = None
    #: whole-world gloo group without a practical timeout, for batch's end-of-run gather: a dp
    #: replica that finishes early waits there for the slowest one (a dead peer still fails it fast)
    patient_group: "dist.ProcessGroup | None" = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"size": self.world_size, "launch": self.launch_kind, "mesh": dict(self.mesh),
                "backend": None if self.ctx is None else self.ctx.backend,
                "device": str(self.placement.device), "dtype": str(self.placement.compute_dtype).replace("torch.", "")}

    # -- small CPU-side exchanges --------------------------------------------------------------
    def _gather_in(self, group: "dist.ProcessGroup | None", obj: Any) -> list[Any]:
        if group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def _replica_gather(self, obj: Any) -> list[Any]:
        """Everyone of this dp replica (cfg x sp ranks), never other replicas: they may be elsewhere."""
        if self.pmesh is None:
            return [obj]
        per_sp = self._gather_in(self.pmesh.cpu_group("sp"), obj)
        per_cfg = self._gather_in(self.pmesh.cpu_group("cfg"), per_sp)
        return [x for half in per_cfg for x in half]

    def gather_decisions(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All branches' decisions of this replica (with CFG-parallel each half holds one)."""
        if self.pmesh is None or self.mesh["cfg"] == 1:
            return sorted(local, key=lambda d: d["index"])
        halves = self._gather_in(self.pmesh.cpu_group("cfg"), local)
        return sorted((d for half in halves for d in half), key=lambda d: d["index"])

    def gather_records(self, local: list[Any]) -> list[Any]:
        if self.pmesh is None or self.mesh["cfg"] == 1:
            return sorted(local, key=lambda r: r.index)
        halves = self._gather_in(self.pmesh.cpu_group("cfg"), local)
        return sorted((r for half in halves for r in half), key=lambda r: r.index)

    def gather_peak_memory(self) -> list[dict[str, Any]]:
        mine = {"rank": self.rank, **peak_memory_mb(self.placement.device)}
        return sorted(self._replica_gather(mine), key=lambda m: m["rank"])

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed everywhere (a drawn seed must be the same on every rank)."""
        return self.all_gather_object(seed)[0]

    def all_gather_object(self, obj: Any, *, patient: bool = False) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (CPU-side, small objects only).

        `patient`: wait as long as other dp replicas need (batch's final gather), not --dist-timeout.
        """
        if self.ctx is None or not self.ctx.is_distributed:
            return [obj]
        group = self.patient_group if patient and self.patient_group is not None else self.ctx.cpu_group
        return self._gather_in(group, obj)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        self.all_gather_object(None)

    def shutdown(self, clean: bool = True) -> None:
        """Tear down process groups; `clean=False` after a failure skips the final barrier."""
        ctx, self.ctx, self.pmesh, self.patient_group = self.ctx, None, None, None
        self.sync = self.reduce_sum = None
        self.sharding, self.exchange, self.fsdp_mesh = LocalSequence(), SerialBranches(), None
        if ctx is not None:
            with _signals_deferred(deliver=clean):
                ctx.shutdown(clean=clean)


@contextlib.contextmanager
def _signals_deferred(*, deliver: bool) -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the process groups are gone; then deliver them, or drop them.

    After a peer dies, torchrun/srun SIGTERM the survivors while they are already tearing down;
    our handler raising `Terminated` in the middle of DistContext.shutdown would skip releasing the
    groups and bring back the gloo abort at exit. `deliver=False` (teardown after a failure): the
    process is already ending with the real reason (a dead peer, a full disk), which a late
    "stopped by SIGTERM" would hide; `deliver=True` (clean end): re-raise, so the exit is 143/130.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if callable(handler):  # a Python handler (ours, or KeyboardInterrupt's); leave SIG_IGN/SIG_DFL be
            saved[sig] = handler
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending) if deliver else ():
            signal.raise_signal(sig)


@contextlib.contextmanager
def running(cfg: RunConfig, *, num_heads: int, allow_data_parallel: bool = False) -> Iterator[Runtime]:
    """`start_runtime`, and a teardown that always runs and never leaves a group alive.

    After a failure the teardown skips its barrier (a peer may never reach it) and first clears
    the traceback's frames: they hold the models, whose FSDP/Ulysses state references process
    groups, and a group that outlives shutdown is the gloo exit abort (see parallel.dist).
    """
    rt = start_runtime(cfg, num_heads=num_heads, allow_data_parallel=allow_data_parallel)
    clean = False
    try:
        yield rt
        clean = True
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        rt.shutdown(clean=clean)


def _device_preference(requested: str | None) -> str:
    if requested is None:
        return "auto"
    return "cpu" if requested.startswith("cpu") else "cuda"


def start_runtime(cfg: RunConfig, *, num_heads: int, allow_data_parallel: bool = False) -> Runtime:
    """Validate the layout for this world, join the process group, build the mesh.

    Every rank runs the same checks before any collective, so a bad layout makes every rank exit
    2 with the same message (printed once, by rank 0) instead of hanging in a rendezvous.
    """
    from parallel.launch import LaunchError, detect_launch
    from parallel.mesh import ParallelConfigError, ParallelDims, check_heads

    try:
        env = detect_launch()
        check_heads(num_heads, cfg.ulysses_size)
    except (LaunchError, ParallelConfigError) as e:
        raise UsageError(str(e).replace("ulysses size", "--ulysses_size")) from None
    cfg_degree = 2 if cfg.cfg_parallel else 1
    if cfg.cfg_parallel and env.world_size < 2:
        raise UsageError("--cfg-parallel needs an even number of ranks (>= 2): launch with torchrun or srun")
    if cfg.t5_fsdp and cfg.t5_cpu:
        raise UsageError("--t5_fsdp and --t5_cpu exclude each other: FSDP shards T5 on the GPUs")
    try:
        dims = ParallelDims.from_world(env.world_size, sp=cfg.ulysses_size, cfg=cfg_degree)
    except ParallelConfigError as e:
        raise UsageError(str(e)) from None
    if dims.dp > 1 and not allow_data_parallel:
        raise UsageError(
            f"{env.world_size} ranks but --ulysses_size {cfg.ulysses_size} x cfg {cfg_degree} uses "
            f"{cfg.ulysses_size * cfg_degree}: one video needs exactly ulysses x cfg ranks "
            "(pass --ulysses_size), or use `magcache-launch batch` to spread prompts over replicas"
        )
    if env.world_size == 1:
        return Runtime(placement=placement_for(cfg), launch_kind=env.kind)
    return _start_distributed(cfg, env, dims, patient=allow_data_parallel and dims.dp > 1)


def _start_distributed(cfg: RunConfig, env: Any, dims: Any, *, patient: bool) -> Runtime:
    from parallel.dist import agree_min, init_distributed, reduce_sum

    ctx = init_distributed(env, device_preference=_device_preference(cfg.device), timeout=cfg.dist_timeout_s)
    try:
        pmesh = dims.build(ctx)
        placement = placement_for(cfg, local_rank=env.local_rank, world_size=env.world_size, device=ctx.device)
        rt = Runtime(
            placement=placement, rank=env.rank, world_size=env.world_size, launch_kind=env.kind,
            mesh={"dp": dims.dp, "cfg": dims.cfg, "sp": dims.sp}, dp_rank=pmesh.dp_rank, dp_size=dims.dp,
            ctx=ctx, pmesh=pmesh,
        )
        leader = pmesh.cfg_rank == 0 and pmesh.sp_rank == 0
        rt.is_output_rank = rt.decodes = leader
        if dims.sp > 1:
            rt.sharding = UlyssesSequence(pmesh.sp_group, pmesh.sp_rank, dims.sp)
            rt.sync = agree_min(pmesh.branch_cpu_group)
            rt.reduce_sum = reduce_sum(pmesh.branch_group)
            if cfg.dit_fsdp or cfg.t5_fsdp:
                rt.fsdp_mesh = pmesh.submesh("sp")
        if dims.cfg > 1:
            rt.exchange = CfgParallelBranches(pmesh.cfg_group, pmesh.cfg_rank)
        if patient:
            import datetime

            import torch.distributed as dist

            rt.patient_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
            ctx.adopt([rt.patient_group])
        return rt
    except BaseException:
        ctx.shutdown(clean=False)
        raise
