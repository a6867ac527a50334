"""The one place that turns degrees (dp, cfg, sp) into a DeviceMesh, groups and coordinates.

Nothing else in the project computes ranks: callers ask `ParallelMesh` for the sp group, the
cfg group or this rank's cfg half. Rank order is dp-major, sp-minor, so the ranks of one
sequence group are neighbours. Inside it (ring x Ulysses) the order is ring-major, Ulysses-minor:
a Ulysses group is consecutive ranks (one node, fastest links, all-to-all) and a ring group strides
over them (across nodes, where point-to-point to one neighbour suits the slower link).
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
    #: sequence-parallel size, ring x Ulysses (also the FSDP shard group and the MagCache agreement group)
    sp: int
    #: total number of ranks
    world_size: int
    #: ring-attention degree, the outer factor of sp (1: Ulysses alone)
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "cfg", "sp", "world_size", "ring"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.cfg not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2 (cond/uncond halves), got {self.cfg}")
        if self.sp % self.ring:
            raise ParallelConfigError(f"ring size {self.ring} does not divide the sequence-parallel size {self.sp}")
        if self.dp * self.cfg * self.sp != self.world_size:
            raise ParallelConfigError(f"dp {self.dp} x cfg {self.cfg} x sp {self.sp} = "
                                      f"{self.dp * self.cfg * self.sp} ranks, but the world has {self.world_size}; "
                                      "make the product equal the number of launched ranks")

    @property
    def ulysses(self) -> int:
        """Ulysses degree, the inner factor of sp."""
        return self.sp // self.ring

    @classmethod
    def from_world(cls, world_size: int, *, sp: int = 1, cfg: int = 1, ring: int = 1) -> ParallelDims:
        """Whatever the sequence group (ring x `sp`, `sp` being the Ulysses degree) and cfg leave over becomes dp."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ParallelConfigError(f"world size must be an integer >= 1, got {world_size!r}")
        if sp < 1:
            raise ParallelConfigError(f"ulysses size must be >= 1, got {sp}")
        if ring < 1:
            raise ParallelConfigError(f"ring size must be >= 1, got {ring}")
        if cfg not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2 (cond/uncond halves), got {cfg}")
        per = ring * sp * cfg
        if world_size % per:
            ring_part = f"ring size {ring} x " if ring > 1 else ""
            raise ParallelConfigError(f"{world_size} ranks are not divisible by {ring_part}ulysses size {sp} x cfg {cfg} = "
                                      f"{per}; launch a multiple of {per} ranks or change "
                                      f"{'--ring_size/' if ring > 1 else ''}--ulysses_size/--cfg-parallel")
        return cls(dp=world_size // per, cfg=cfg, sp=ring * sp, world_size=world_size, ring=ring)

    def degree(self, name: DimName) -> int:
        return {"dp": self.dp, "cfg": self.cfg, "sp": self.sp}[name]

    def sequence_groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """Global ranks of every (Ulysses groups, ring groups) of the world, ring-major inside each sp group."""
        u, r = self.ulysses, self.ring
        ulysses, ring = [], []
        for base in range(0, self.world_size, self.sp):
            ulysses += [[base + i * u + j for j in range(u)] for i in range(r)]
            ring += [[base + i * u + j for i in range(r)] for j in range(u)]
        return ulysses, ring

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
        self._ulysses: dist.ProcessGroup | None = None
        self._ring: dist.ProcessGroup | None = None
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
        self._ulysses, self._ring = self._sequence_subgroups(ctx)
        extra = [g for g in (self._ulysses, self._ring) if g is not None and g is not self.group("sp")]
        ctx.adopt([*self._all_groups(), self._replica, *extra], release=self.release)

    def _sequence_subgroups(self, ctx: DistContext) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(Ulysses group, ring group) of this rank on the compute backend; None where the degree is 1.

        With one of the two degrees 1 the other is the whole sp group; only ring x Ulysses > 1 x > 1
        builds new groups (collective: every rank builds every one).
        """
        d = self.dims
        sp = self.group("sp")
        if d.ring == 1:
            return sp, None
        if d.ulysses == 1:
            return None, sp
        backend = "gloo" if ctx.device.type == "cpu" else None
        ulysses_ranks, ring_ranks = d.sequence_groups()
        ulysses, _ = dist.new_subgroups_by_enumeration(ulysses_ranks, backend=backend)
        ring, _ = dist.new_subgroups_by_enumeration(ring_ranks, backend=backend)
        return ulysses, ring

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
        self._ulysses = self._ring = None
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
    def ulysses_group(self) -> dist.ProcessGroup | None:
        """The Ulysses (all-to-all) part of the sequence group: consecutive ranks; None when its degree is 1."""
        self._live(self._mesh)
        return self._ulysses

    @property
    def ring_group(self) -> dist.ProcessGroup | None:
        """The ring (point-to-point) part of the sequence group, strided over it; None when the ring is 1."""
        self._live(self._mesh)
        return self._ring

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
        return (f"ParallelMesh(dp={d.dp}, cfg={d.cfg}, sp={d.sp} (ring {d.ring}), rank={self.rank}, "
                f"coords=(dp={self.dp_rank}, cfg={self.cfg_rank}, sp={self.sp_rank}))")
