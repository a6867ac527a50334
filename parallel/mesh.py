"""The one place that turns degrees (dp, cfg, ring, ulysses) into process groups and coordinates.

Nothing else in the project computes ranks or checks degrees: callers ask `ParallelMesh` for the
sp group, the cfg group or this rank's cfg half. The layout is one row-major (dp, cfg, ring,
ulysses) grid: a Ulysses group is consecutive ranks (one node, fastest links, all-to-all), a ring
group strides over them (across nodes, point-to-point to one neighbour), and the ranks of one
video are neighbours. Two flattened dims are named as well (torchtitan / diffusers 0.42 style):
`sp` = ring x ulysses (the sequence group: attention, the FSDP shards, the MagCache agreement) and
`replica` = cfg x sp (every rank of one video: the split VAE decode).

Every group is built by enumeration with an explicit backend (`new_subgroups_by_enumeration`,
"nccl" on CUDA, "gloo" on the CPU) and wrapped as a DeviceMesh (`DeviceMesh.from_group`). So the
CUDA path is the very code the CPU tests run on gloo, and nothing goes through `split_group` on
the mixed "cpu:gloo,cuda:nccl" world group (which splits gloo with NCCL's options).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

if TYPE_CHECKING:
    from parallel.dist import DistContext

#: the grid's axes, slowest first
AXES: tuple[str, ...] = ("dp", "cfg", "ring", "ulysses")
#: flattened dims: name -> the axes it spans
FLAT: dict[str, tuple[str, ...]] = {"sp": ("ring", "ulysses"), "replica": ("cfg", "ring", "ulysses")}
DimName = Literal["dp", "cfg", "ring", "ulysses", "sp", "replica"]
DIM_NAMES: tuple[str, ...] = ("dp", "cfg", "sp")


class ParallelConfigError(ValueError):
    """Degrees that cannot be laid out on this world; the message says what to change."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_heads(num_heads: int, sp: int) -> None:
    """Ulysses gives each rank num_heads/sp whole heads, so sp must divide the head count."""
    if sp < 1:
        raise ParallelConfigError(f"--ulysses_size must be >= 1, got {sp}")
    if num_heads % sp:
        raise ParallelConfigError(f"--ulysses_size {sp} does not divide the {num_heads} attention heads; "
                                  f"use one of {_divisors(num_heads)}")


def enumerated_group(partition: list[list[int]], backend: str, timeout: timedelta | None = None) -> dist.ProcessGroup:
    """This rank's group of `partition`, every group of it built with `backend` (collective: all ranks
    call it with the same partition, in the same order)."""
    group, _ = dist.new_subgroups_by_enumeration(partition, timeout=timeout, backend=backend)
    return group


def one_dim_mesh(group: dist.ProcessGroup, device_type: str, name: str) -> DeviceMesh:
    """A 1-D DeviceMesh over an existing group (no group is created)."""
    return DeviceMesh.from_group(group, device_type, mesh_dim_names=(name,))


def compute_backend(device: torch.device) -> str:
    """The backend of a mesh's groups on this device (explicit: never the mixed world group's split)."""
    return "gloo" if device.type == "cpu" else "nccl"


@dataclass(frozen=True, slots=True)
class ParallelDims:
    """Degrees of the grid: world = dp * cfg * sp, sp = ring * ulysses. Pure data, checked on creation."""

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
    def from_world(cls, world_size: int, *, ulysses: int = 1, cfg: int = 1, ring: int = 1,
                   num_heads: int | None = None) -> ParallelDims:
        """Whatever one video's ranks (cfg x ring x ulysses) leave over becomes dp; every degree rule
        of the launcher's flags is checked here, with the flag to change in the one-line message."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ParallelConfigError(f"world size must be an integer >= 1, got {world_size!r}")
        if num_heads is not None:
            check_heads(num_heads, ulysses)
        if ulysses < 1:
            raise ParallelConfigError(f"--ulysses_size must be >= 1, got {ulysses}")
        if ring < 1:
            raise ParallelConfigError(f"--ring_size must be >= 1, got {ring}")
        if cfg not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2 (cond/uncond halves), got {cfg}")
        if cfg == 2 and world_size < 2:
            raise ParallelConfigError("--cfg-parallel needs an even number of ranks (>= 2): launch with torchrun or srun")
        per = ring * ulysses * cfg
        if world_size % per:
            ring_part = f"--ring_size {ring} x " if ring > 1 else ""
            raise ParallelConfigError(
                f"{ring_part}--ulysses_size {ulysses} x config {cfg} = {per} ranks per video, but "
                f"{world_size} were launched; launch a multiple of {per} ranks or change "
                f"{'--ring_size/' if ring > 1 else ''}--ulysses_size/--cfg-parallel")
        return cls(dp=world_size // per, cfg=cfg, sp=ring * ulysses, world_size=world_size, ring=ring)

    def degree(self, name: str) -> int:
        """Size of an axis or of a flattened dim."""
        axes = {"dp": self.dp, "cfg": self.cfg, "ring": self.ring, "ulysses": self.ulysses}
        if name in axes:
            return axes[name]
        if name in FLAT:
            return math.prod(axes[a] for a in FLAT[name])
        raise KeyError(f"no mesh dim {name!r}; the dims are {AXES + tuple(FLAT)}")

    def grid(self) -> np.ndarray:
        """Global ranks laid out as the (dp, cfg, ring, ulysses) grid, row-major (numpy: rank arithmetic
        stays plain integers whatever tensor mode is active, e.g. a dry run's FakeTensorMode)."""
        return np.arange(self.world_size).reshape(*(self.degree(a) for a in AXES))

    def axes_of(self, name: str) -> tuple[str, ...]:
        return FLAT.get(name, (name,))

    def partition(self, name: str) -> list[list[int]]:
        """Every group along a dim (an axis or a flattened dim): the ranks that differ only along it."""
        spanned = self.axes_of(name)
        if any(a not in AXES for a in spanned):
            raise KeyError(f"no mesh dim {name!r}; the dims are {AXES + tuple(FLAT)}")
        others = [i for i, a in enumerate(AXES) if a not in spanned]
        inner = [AXES.index(a) for a in spanned]
        return self.grid().transpose(*others, *inner).reshape(-1, self.degree(name)).tolist()

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis and flattened dim."""
        coords = dict(zip(AXES, (int(c) for c in np.argwhere(self.grid() == rank)[0])))
        for name, spanned in FLAT.items():
            index = 0
            for a in spanned:
                index = index * self.degree(a) + coords[a]
            coords[name] = index
        return coords

    def sequence_groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """Global ranks of every (Ulysses groups, ring groups) of the world."""
        return self.partition("ulysses"), self.partition("ring")

    def build(self, ctx: DistContext) -> ParallelMesh:
        """Create the groups (collective: every rank calls it, in the same order)."""
        if ctx.world_size != self.world_size:
            raise ParallelConfigError(f"dims are for {self.world_size} ranks but this job has {ctx.world_size}; "
                                      "build ParallelDims from the launched world size")
        return ParallelMesh(self, ctx)


class ParallelMesh:
    """Groups and coordinates of this rank: one DeviceMesh over the axes larger than 1, and 1-D
    meshes for the flattened `sp` and `replica` dims, every group built by enumeration.

    Dims of size 1 get no group (no idle gloo threads, no communicators): `group()` is None,
    `coordinate()` is 0, and every parallel/ function treats a None group as "one rank".
    A flattened dim that spans one non-trivial axis is that axis' group, not a second one.
    On CUDA each dim the host reads CPU values over (sp, cfg) also gets a gloo twin, and FSDP gets
    its own communicator over the sp ranks (`fsdp_mesh`), so its all-gathers never queue behind
    Ulysses' all-to-alls on one NCCL stream.
    """

    def __init__(self, dims: ParallelDims, ctx: DistContext) -> None:
        self.dims = dims
        self.rank = ctx.rank
        self.backend = compute_backend(ctx.device)
        self._device_type = ctx.device.type
        self._ctx = ctx
        self._coords = dims.coordinates(ctx.rank) if ctx.is_distributed else {n: 0 for n in (*AXES, *FLAT)}
        self._released = False
        self._groups: dict[str, dist.ProcessGroup] = {}
        self._cpu_groups: dict[str, dist.ProcessGroup] = {}
        self._meshes: dict[str, DeviceMesh] = {}
        self._mesh: DeviceMesh | None = None
        self._fsdp: DeviceMesh | None = None
        if not ctx.is_distributed:
            return
        axes = [a for a in AXES if dims.degree(a) > 1]
        for a in axes:
            self._groups[a] = self._enumerate(a, self.backend)
        for name, spanned in FLAT.items():
            live = [a for a in spanned if dims.degree(a) > 1]
            if len(live) == 1:
                self._groups[name] = self._groups[live[0]]
            elif live:
                self._groups[name] = self._enumerate(name, self.backend)
        for name in ("cfg", "sp"):
            if name in self._groups:
                self._cpu_groups[name] = (self._groups[name] if self.backend == "gloo"
                                          else self._enumerate(name, "gloo"))
        if axes:
            layout = dims.grid().reshape(*(dims.degree(a) for a in axes)).tolist()
            self._mesh = DeviceMesh.from_group([self._groups[a] for a in axes], self._device_type,
                                               mesh=layout, mesh_dim_names=tuple(axes))
        for name in FLAT:
            if name in self._groups:
                self._meshes[name] = one_dim_mesh(self._groups[name], self._device_type, name)
        ctx.adopt([*self._groups.values(), *self._cpu_groups.values()], release=self.release)

    def _enumerate(self, name: str, backend: str) -> dist.ProcessGroup:
        """Every group along `name` (collective: all ranks build all of them, in the same order); this rank's."""
        return enumerated_group(self.dims.partition(name), backend, self._ctx.timeout)

    def _live(self) -> None:
        if self._released:
            raise RuntimeError("ParallelMesh used after DistContext.shutdown(); keep parallel work inside the context")

    def release(self) -> None:
        """Drop the meshes and groups (called by DistContext.shutdown) so the process groups can be freed."""
        self._groups.clear()
        self._cpu_groups.clear()
        self._meshes.clear()
        self._mesh = self._fsdp = None
        self._released = True

    # ---- coordinates
    def coordinate(self, name: str) -> int:
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

    @property
    def replica_rank(self) -> int:
        """This rank's index in `replica_group` (cfg-major, sp-minor)."""
        return self._coords["replica"]

    # ---- meshes and groups
    @property
    def device_mesh(self) -> DeviceMesh | None:
        """The (dp, cfg, ring, ulysses) DeviceMesh over the axes larger than 1; None: one rank."""
        self._live()
        return self._mesh

    def submesh(self, name: str) -> DeviceMesh | None:
        """1-D DeviceMesh along an axis or flattened dim; None when it has size 1."""
        self._live()
        if name in self._meshes:
            return self._meshes[name]
        mesh = self._mesh
        return mesh[name] if mesh is not None and name in (mesh.mesh_dim_names or ()) else None

    def fsdp_mesh(self) -> DeviceMesh | None:
        """A 1-D mesh over the sp ranks on a communicator of its own (collective on first call:
        every rank calls it, in the same order); None when sp is 1."""
        self._live()
        if "sp" not in self._groups:
            return None
        if self._fsdp is None:
            group = self._enumerate("sp", self.backend)
            self._ctx.adopt([group])
            self._fsdp = one_dim_mesh(group, self._device_type, "sp")
        return self._fsdp

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The group along a dim on the compute device's backend; None when that dim has size 1."""
        self._live()
        return self._groups.get(name)

    def cpu_group(self, name: str) -> dist.ProcessGroup | None:
        """The gloo twin of `group(name)` for CPU values (sp and cfg; the same group on CPU runs)."""
        self._live()
        if name not in ("cfg", "sp"):
            raise KeyError(f"no CPU twin for dim {name!r}; CPU values are exchanged over sp and cfg")
        return self._cpu_groups.get(name)

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.group("sp")

    @property
    def ulysses_group(self) -> dist.ProcessGroup | None:
        """The Ulysses (all-to-all) part of the sequence group: consecutive ranks; None when its degree is 1."""
        return self.group("ulysses")

    @property
    def ring_group(self) -> dist.ProcessGroup | None:
        """The ring (point-to-point) part of the sequence group, strided over it; None when the ring is 1."""
        return self.group("ring")

    @property
    def cfg_group(self) -> dist.ProcessGroup | None:
        return self.group("cfg")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.group("dp")

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """Every rank of this dp replica (cfg x sp, the ranks that make one video); None: one rank."""
        return self.group("replica")

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
        return (f"ParallelMesh(dp={d.dp}, cfg={d.cfg}, sp={d.sp} (ring {d.ring} x ulysses {d.ulysses}), "
                f"rank={self.rank}, coords=(dp={self.dp_rank}, cfg={self.cfg_rank}, sp={self.sp_rank}))")
