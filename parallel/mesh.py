"""The one place that turns degrees (dp, cfg, sp) into a DeviceMesh, groups and coordinates.

Nothing else in the project computes ranks: callers ask `ParallelMesh` for the sp group, the
cfg group or this rank's cfg half. Rank order is dp-major, sp-minor, so the ranks of one
Ulysses group are neighbours (same node, fastest links).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

if TYPE_CHECKING:
    from parallel.dist import DistContext

DimName = Literal["dp", "cfg", "sp"]
DIM_NAMES: tuple[DimName, ...] = ("dp", "cfg", "sp")


class ParallelConfigError(ValueError):
    """Degrees that cannot be laid out on this world; the message says what to change."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_heads(num_heads: int, sp: int) -> None:
    """Ulysses gives each rank num_heads/sp whole heads, so sp must divide the head count."""
    if sp < 1:
        raise ParallelConfigError(f"ulysses size must be >= 1, got {sp}")
    if num_heads % sp:
        raise ParallelConfigError(f"ulysses size {sp} does not divide the {num_heads} attention heads; "
                                  f"use one of {_divisors(num_heads)}")


@dataclass(frozen=True, slots=True)
class ParallelDims:
    """Degrees of the three mesh dims; world = dp * cfg * sp. Pure data, checked on creation."""

    #: data-parallel replicas (independent prompts/seeds)
    dp: int
    #: 2 with CFG-parallel (cond on half 0, uncond on half 1), else 1
    cfg: int
    #: Ulysses sequence-parallel size (also the FSDP shard group)
    sp: int
    #: total number of ranks
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp", "cfg", "sp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.cfg not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2 (cond/uncond halves), got {self.cfg}")
        if self.dp * self.cfg * self.sp != self.world_size:
            raise ParallelConfigError(f"dp {self.dp} x cfg {self.cfg} x sp {self.sp} = "
                                      f"{self.dp * self.cfg * self.sp} ranks, but the world has {self.world_size}; "
                                      "make the product equal the number of launched ranks")

    @classmethod
    def from_world(cls, world_size: int, *, sp: int = 1, cfg: int = 1) -> ParallelDims:
        """Whatever sp and cfg leave over becomes dp."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ParallelConfigError(f"world size must be an integer >= 1, got {world_size!r}")
        if sp < 1:
            raise ParallelConfigError(f"ulysses size must be >= 1, got {sp}")
        if cfg not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2 (cond/uncond halves), got {cfg}")
        if world_size % (sp * cfg):
            raise ParallelConfigError(f"{world_size} ranks are not divisible by ulysses size {sp} x cfg {cfg} = "
                                      f"{sp * cfg}; launch a multiple of {sp * cfg} ranks or change "
                                      "--ulysses_size/--cfg-parallel")
        return cls(dp=world_size // (sp * cfg), cfg=cfg, sp=sp, world_size=world_size)

    def degree(self, name: DimName) -> int:
        return {"dp": self.dp, "cfg": self.cfg, "sp": self.sp}[name]

    def build(self, ctx: DistContext) -> ParallelMesh:
        """Create the groups (collective: every rank calls it, in the same order)."""
        if ctx.world_size != self.world_size:
            raise ParallelConfigError(f"dims are for {self.world_size} ranks but this job has {ctx.world_size}; "
                                      "build ParallelDims from the launched world size")
        return ParallelMesh(self, ctx)


class ParallelMesh:
    """Groups and coordinates of this rank, backed by one DeviceMesh over the dims larger than 1.

    Dims of size 1 are left out of the DeviceMesh (no idle gloo threads, no connections); for
    them `group()` is None, `coordinate()` is 0, and every parallel/ function treats a None group
    as "one rank": plain computation, no collective.
    """

    def __init__(self, dims: ParallelDims, ctx: DistContext) -> None:
        self.dims = dims
        self.rank = ctx.rank
        self._names = tuple(n for n in DIM_NAMES if dims.degree(n) > 1)
        self._mesh: DeviceMesh | None = None
        self._cpu_mesh: DeviceMesh | None = None
        self._coords = {n: 0 for n in DIM_NAMES}
        self._released = False
        self._replica: dist.ProcessGroup | None = None
        if not ctx.is_distributed or not self._names:
            return
        shape = tuple(dims.degree(n) for n in self._names)
        self._mesh = init_device_mesh(ctx.device.type, shape, mesh_dim_names=self._names)
        if ctx.device.type == "cpu":
            self._cpu_mesh = self._mesh  # already gloo: its groups carry CPU tensors
        else:
            # Explicit gloo twins: on CUDA the mesh may split NCCL communicators, which carry no
            # CPU tensors; the MagCache decision is agreed on these.
            self._cpu_mesh = init_device_mesh("cpu", shape, mesh_dim_names=self._names,
                                              backend_override={n: "gloo" for n in self._names})
        for n in self._names:
            self._coords[n] = self._mesh.get_local_rank(n)
        self._replica = self._replica_group(ctx)
        ctx.adopt([*self._all_groups(), self._replica], release=self.release)

    def _replica_group(self, ctx: DistContext) -> dist.ProcessGroup | None:
        """cfg x sp ranks of this dp replica on the compute backend (collective: every rank builds every one).

        Only built when both dims exceed 1; otherwise the replica is the one non-trivial dim's group.
        """
        d = self.dims
        if d.cfg == 1 or d.sp == 1:
            return None
        per = d.cfg * d.sp
        group, _ = dist.new_subgroups_by_enumeration(
            [list(range(r * per, (r + 1) * per)) for r in range(d.dp)],
            backend="gloo" if ctx.device.type == "cpu" else None)
        return group

    def _all_groups(self) -> list[dist.ProcessGroup]:
        meshes = [self._mesh] if self._cpu_mesh is self._mesh else [self._mesh, self._cpu_mesh]
        return [m.get_group(n) for m in meshes if m is not None for n in self._names]

    def _live(self, mesh: DeviceMesh | None) -> DeviceMesh | None:
        if self._released:
            raise RuntimeError("ParallelMesh used after DistContext.shutdown(); keep parallel work inside the context")
        return mesh

    def release(self) -> None:
        """Drop the meshes (called by DistContext.shutdown) so their process groups can be freed."""
        self._mesh = None
        self._cpu_mesh = None
        self._replica = None
        self._released = True

    # ---- coordinates
    def coordinate(self, name: DimName) -> int:
        """This rank's index along a dim (0 on a dim of size 1)."""
        return self._coords[name]

    @property
    def dp_rank(self) -> int:
        return self._coords["dp"]

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the cond branch; 1: the uncond branch (only with cfg = 2)."""
        return self._coords["cfg"]

    @property
    def sp_rank(self) -> int:
        return self._coords["sp"]

    # ---- groups
    def submesh(self, name: DimName) -> DeviceMesh | None:
        """1-D DeviceMesh along a dim (for FSDP over sp); None when that dim has size 1."""
        mesh = self._live(self._mesh)
        return mesh[name] if mesh is not None and name in self._names else None

    def group(self, name: DimName) -> dist.ProcessGroup | None:
        """The group along a dim on the compute device's backend; None when that dim has size 1."""
        mesh = self._live(self._mesh)
        return mesh.get_group(name) if mesh is not None and name in self._names else None

    def cpu_group(self, name: DimName) -> dist.ProcessGroup | None:
        """The gloo twin of `group(name)`, for CPU values (the same group on CPU runs)."""
        mesh = self._live(self._cpu_mesh)
        return mesh.get_group(name) if mesh is not None and name in self._names else None

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.group("sp")

    @property
    def cfg_group(self) -> dist.ProcessGroup | None:
        return self.group("cfg")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.group("dp")

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """Every rank of this dp replica (cfg x sp, the ranks that make one video); None: one rank."""
        self._live(self._mesh)
        if self.dims.cfg > 1 and self.dims.sp > 1:
            return self._replica
        cfg = self.group("cfg")
        return cfg if cfg is not None else self.group("sp")

    @property
    def replica_rank(self) -> int:
        """This rank's index in `replica_group` (rank order is dp-major, sp-minor)."""
        return self.cfg_rank * self.dims.sp + self.sp_rank

    @property
    def branch_group(self) -> dist.ProcessGroup | None:
        """The ranks that compute one CFG branch of one dp replica together (= the sp group).

        MagCache decisions are agreed here and only here: with CFG-parallel the other half
        decides for its own branch and never waits on this one.
        """
        return self.sp_group

    @property
    def branch_cpu_group(self) -> dist.ProcessGroup | None:
        """Gloo twin of `branch_group`: pass it to `parallel.dist.agree_min`."""
        return self.cpu_group("sp")

    def __repr__(self) -> str:
        d = self.dims
        return (f"ParallelMesh(dp={d.dp}, cfg={d.cfg}, sp={d.sp}, rank={self.rank}, "
                f"coords=(dp={self.dp_rank}, cfg={self.cfg_rank}, sp={self.sp_rank}))")
