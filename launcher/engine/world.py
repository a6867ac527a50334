"""The ranks of a run, built once: launch environment, process groups, mesh, placement.

`open_world(config, ...)` is the one run lifecycle of `generate` and `batch`: check the layout for
this world (every rank, before any rendezvous), join the process group, build the mesh, yield a
frozen `World`, and always tear down. The session and pipeline never compute ranks or call
collectives themselves; they ask the World. Groups come from `parallel/`.
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from launcher.config import RunConfig
from launcher.errors import UsageError
from launcher.signals import signals_deferred
from launcher.engine.placement import Placement, peak_memory_mb, placement_for

if TYPE_CHECKING:
    import torch.distributed as dist

    from parallel.dist import DistContext
    from parallel.launch import LaunchEnv
    from parallel.mesh import ParallelDims, ParallelMesh


@dataclass
class _Groups:
    """The process-group handles a World holds; emptied at teardown.

    Separate from the frozen World so that shutdown can drop every reference: a gloo group that
    outlives `destroy_process_group` is freed during interpreter exit and aborts it (parallel.dist).
    """

    ctx: "DistContext | None" = None
    mesh: "ParallelMesh | None" = None
    #: whole-world gloo group without a practical timeout, for batch's end-of-run gather: a dp
    #: replica that finishes early waits there for the slowest one (a dead peer still fails it fast)
    patient: "dist.ProcessGroup | None" = None


@dataclass(frozen=True)
class World:
    """This rank's place in the run: who it is, what it computes, where its tensors live."""

    placement: Placement
    rank: int = 0
    world_size: int = 1
    launch_kind: str = "single"
    #: data-parallel replicas x classifier-free-guidance halves x sequence-parallel ranks = world_size
    dp_size: int = 1
    cfg_size: int = 1
    sp_size: int = 1
    #: ring-attention degree, the outer factor of sp_size (1: Ulysses alone)
    ring_size: int = 1
    dp_rank: int = 0
    #: writes this replica's outputs and decodes (rank 0 of each dp group's config x sp block)
    is_output_rank: bool = True
    _groups: _Groups = field(default_factory=_Groups, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mesh(self) -> "ParallelMesh | None":
        """The parallel mesh (None in one process) for `launcher.wan.parallelize`."""
        return self._groups.mesh

    @property
    def mesh_shape(self) -> dict[str, int]:
        shape = {"dp": self.dp_size, "cfg": self.cfg_size, "sp": self.sp_size}
        if self.ring_size > 1:  # sp = ring x ulysses; absent without a ring, as before
            shape.update(ring=self.ring_size, ulysses=self.sp_size // self.ring_size)
        return shape

    def describe(self) -> dict[str, Any]:
        ctx = self._groups.ctx
        return {"size": self.world_size, "launch": self.launch_kind, "mesh": self.mesh_shape,
                "backend": None if ctx is None else ctx.backend,
                "rendezvous": None if ctx is None or ctx.route is None else ctx.route.as_dict(),
                "device": str(self.placement.device), "attention": self.placement.attention, "dtype": str(self.placement.compute_dtype).replace("torch.", ""),
                "memory": asdict(self.placement.memory)}

    # -- what MagCache needs from the ranks of one branch ---------------------------------------
    def magcache_sync(self) -> Callable[[bool], bool] | None:
        """The "may skip" agreement among the ranks computing one branch (None: nobody to agree with)."""
        mesh = self._groups.mesh
        if mesh is None or self.sp_size == 1:
            return None
        from parallel.dist import agree_min

        return agree_min(mesh.branch_cpu_group)

    def branch_sum(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """SUM over the sequence group, for calibration statistics (None: one rank holds the sequence)."""
        mesh = self._groups.mesh
        if mesh is None or self.sp_size == 1:
            return None
        from parallel.dist import reduce_sum

        return reduce_sum(mesh.branch_group)

    # -- small CPU-side exchanges -----------------------------------------------------------------
    @staticmethod
    def _gather_in(group: "dist.ProcessGroup | None", obj: Any) -> list[Any]:
        if group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def _replica_gather(self, obj: Any) -> list[Any]:
        """Everyone of this dp replica (config x sp ranks), never other replicas: they may be elsewhere."""
        mesh = self._groups.mesh
        if mesh is None:
            return [obj]
        per_sp = self._gather_in(mesh.cpu_group("sp"), obj)
        per_cfg = self._gather_in(mesh.cpu_group("cfg"), per_sp)
        return [x for half in per_cfg for x in half]

    def gather_branches(self, local: list[Any], index: Callable[[Any], int]) -> list[Any]:
        """Both branches' items of this replica, sorted by `index` (with CFG-parallel each half holds one)."""
        mesh = self._groups.mesh
        if mesh is None or self.cfg_size == 1:
            return sorted(local, key=index)
        halves = self._gather_in(mesh.cpu_group("cfg"), local)
        return sorted((x for half in halves for x in half), key=index)

    def gather_peak_memory(self, *, at_least_cuda_mb: float | None = None) -> list[dict[str, Any]]:
        """Per-rank peaks of this replica. `at_least_cuda_mb`: a CUDA peak from before a counter reset
        (the split decode resets it to measure its own peak), folded back in."""
        mine = {"rank": self.rank, **peak_memory_mb(self.placement.device)}
        if at_least_cuda_mb is not None and "cuda_allocated_mb" in mine:
            mine["cuda_allocated_mb"] = max(mine["cuda_allocated_mb"], at_least_cuda_mb)
        return sorted(self._replica_gather(mine), key=lambda m: m["rank"])

    # -- the VAE decode ----------------------------------------------------------------------------
    def gather_in_replica(self, obj: Any) -> list[Any]:
        """Every rank of this dp replica's `obj`, in replica order (cfg-major, sp-minor)."""
        return self._replica_gather(obj)

    @property
    def replica_leaders(self) -> list[int]:
        """The first (output) rank of each dp replica (rank order is dp-major)."""
        per = self.world_size // self.dp_size
        return [r * per for r in range(self.dp_size)]

    def dispatch_groups(self) -> dict[int, "dist.ProcessGroup"]:
        """Per dp replica r >= 1, a gloo group of rank 0 and r's leader without a practical timeout
        (a job's result comes back when the video is made), for the server's per-replica dispatch.
        Every rank builds every one, in order; returned: the ones this rank is in."""
        g = self._groups
        if g.ctx is None or not g.ctx.is_distributed or self.dp_size == 1:
            return {}
        import datetime

        import torch.distributed as dist

        mine = {}
        for replica, leader in enumerate(self.replica_leaders[1:], start=1):
            group = dist.new_group([0, leader], backend="gloo", timeout=datetime.timedelta(days=7))
            if self.rank in (0, leader):
                g.ctx.adopt([group])
                mine[replica] = group
        return mine

    def replica_broadcast(self, obj: Any) -> Any:
        """This replica's leader's `obj` on every rank of the replica (no-op alone)."""
        if self.cfg_size * self.sp_size == 1:
            return obj
        return self._replica_gather(obj)[0]

    def agree_in_replica(self, flag: bool) -> bool:
        """True on every rank of this dp replica when any of them says so (one small gather; no-op alone)."""
        if self.cfg_size * self.sp_size == 1:
            return flag
        return any(self._replica_gather(bool(flag)))

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed everywhere (a drawn seed must be the same on every rank)."""
        return self.all_gather_object(seed)[0]

    def all_gather_object(self, obj: Any, *, patient: bool = False) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (CPU-side, small objects only).

        `patient`: wait as long as other dp replicas need (batch's final gather), not --dist-timeout.
        """
        g = self._groups
        if g.ctx is None or not g.ctx.is_distributed:
            return [obj]
        group = g.patient if patient and g.patient is not None else g.ctx.cpu_group
        return self._gather_in(group, obj)

    def side_group(self) -> "dist.ProcessGroup | None":
        """A new whole-world gloo group for a side thread's collectives (the server's liveness
        heartbeat), apart from the groups the main thread uses; None in one process. Every rank
        calls it, in the same order; the caller drops its reference before teardown."""
        g = self._groups
        if g.ctx is None or not g.ctx.is_distributed:
            return None
        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=g.ctx.timeout)
        g.ctx.adopt([group])
        return group

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        self.all_gather_object(None)

    def shutdown(self, clean: bool = True) -> None:
        """Tear down process groups; `clean=False` after a failure skips the final barrier."""
        g = self._groups
        ctx = g.ctx
        g.ctx = g.mesh = g.patient = None
        if ctx is not None:
            with signals_deferred(deliver=clean):
                ctx.shutdown(clean=clean)


@contextlib.contextmanager
def open_world(config: RunConfig, *, num_heads: int, allow_data_parallel: bool = False) -> Iterator[World]:
    """`start_world`, and a teardown that always runs and never leaves a group alive.

    After a failure the teardown skips its barrier (a peer may never reach it) and first clears
    the traceback's frames: they hold the models, whose FSDP/Ulysses state references process
    groups, and a group that outlives shutdown is the gloo exit abort (see parallel.dist).
    """
    world = start_world(config, num_heads=num_heads, allow_data_parallel=allow_data_parallel)
    clean = False
    try:
        yield world
        clean = True
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        world.shutdown(clean=clean)


def _device_preference(requested: str | None) -> str:
    if requested is None:
        return "auto"
    return "cpu" if requested.startswith("cpu") else "cuda"


def start_world(config: RunConfig, *, num_heads: int, allow_data_parallel: bool = False) -> World:
    """Validate the layout for this world, join the process group, build the mesh.

    Every rank runs the same checks before any collective, so a bad layout makes every rank exit
    2 with the same message (printed once, by rank 0) instead of hanging in a rendezvous.
    """
    from parallel.launch import detect_launch
    from parallel.mesh import ParallelConfigError, ParallelDims

    env = detect_launch()
    if env.world_size > 1 and config.device and config.device.startswith("cuda:"):
        raise UsageError(f"--device {config.device} would put every rank on that one GPU; under torchrun/srun leave "
                         "--device out (rank r takes cuda:LOCAL_RANK) or pick GPUs with CUDA_VISIBLE_DEVICES")
    if config.t5_fsdp and config.t5_cpu:
        raise UsageError("--t5_fsdp and --t5_cpu exclude each other: FSDP shards T5 on the GPUs")
    cfg_degree = 2 if config.cfg_parallel else 1
    ring = config.ring_size
    try:
        dims = ParallelDims.from_world(env.world_size, ulysses=config.ulysses_size, cfg=cfg_degree, ring=ring,
                                       num_heads=num_heads)
    except ParallelConfigError as e:
        raise UsageError(str(e)) from None
    if dims.dp > 1 and not allow_data_parallel:
        ring_part = f"--ring_size {ring} x " if ring > 1 else ""
        raise UsageError(
            f"{env.world_size} ranks but {ring_part}--ulysses_size {config.ulysses_size} x config {cfg_degree} uses "
            f"{dims.sp * cfg_degree}: one video needs exactly {'ring x ' if ring > 1 else ''}ulysses x config ranks "
            f"(pass --ulysses_size{' or --ring_size' if ring > 1 else ''}), or use `magcache-launch batch` to spread "
            "prompts over replicas"
        )
    if env.world_size == 1:
        return single_world(config, launch_kind=env.kind)
    return _start_distributed(config, env, dims, patient=allow_data_parallel and dims.dp > 1)


def single_world(config: RunConfig, *, launch_kind: str = "single",
                 set_device: Callable[[torch.device], None] | None = None) -> World:
    """The one-process World, its device made current (`--device cuda:N` must not touch cuda:0)."""
    from parallel.dist import bind_device

    placement = placement_for(config)
    bind_device(placement.device, set_device=set_device)
    return World(placement=placement, launch_kind=launch_kind)


def _start_distributed(config: RunConfig, env: "LaunchEnv", dims: "ParallelDims", *, patient: bool) -> World:
    from parallel.dist import init_distributed

    ctx = init_distributed(env, device_preference=_device_preference(config.device), timeout=config.dist_timeout_s)
    if ctx.route is not None and env.local_rank == 0:
        # once per node: where this node met the others, and on which interface (multi-node debugging)
        print(f"[rank {env.rank}] {ctx.route.describe()}", file=sys.stderr, flush=True)
    try:
        mesh = dims.build(ctx)
        groups = _Groups(ctx=ctx, mesh=mesh)
        if patient:
            import datetime

            import torch.distributed as dist

            groups.patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
            ctx.adopt([groups.patient])
        return World(
            placement=placement_for(config, local_rank=env.local_rank, world_size=env.world_size, sp=dims.sp,
                                    device=ctx.device),
            rank=env.rank, world_size=env.world_size, launch_kind=env.kind, dp_size=dims.dp, cfg_size=dims.cfg, sp_size=dims.sp,
            ring_size=dims.ring,
            dp_rank=mesh.dp_rank, is_output_rank=mesh.cfg_rank == 0 and mesh.sp_rank == 0, _groups=groups,
        )
    except BaseException:
        ctx.shutdown(clean=False)
        raise
