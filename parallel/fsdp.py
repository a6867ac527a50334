"""FSDP2 sharding of blocks built on the meta device, and loading each rank's rows from disk.

`shard_modules` applies `fully_shard` per module (per transformer block): each block then owns
its all-gather/reshard hooks, so a forward that calls blocks one by one (as our DiT forward
does) works without the root forward. Root pieces are left out and stay replicated.

`load_sharded` never materialises a full tensor on a rank: for a dim-0 sharded parameter it
reads only rows [start, stop) of this rank's FSDP2 shard and wraps them with
`DTensor.from_local`; FSDP2 pads its own uneven last shard internally. Rows are copied out of
the memory map (`copy=True`): a module must not keep the checkpoint file mapped (pages faulted
in mid-denoise, SIGBUS if the file is replaced).
"""
from __future__ import annotations

from collections.abc import Iterable, KeysView
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard


class RowSource(Protocol):
    """Checkpoint tensors by model parameter name, readable a row range at a time.

    `launcher.checkpoint.sources.TensorSource` has this shape; so does any mmap-backed reader.
    """

    def keys(self) -> KeysView[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> Tensor: ...
    def get_slice(self, key: str, start: int, stop: int) -> Tensor: ...


class ShardedLoadError(ValueError):
    """The checkpoint does not fit the model; the message names the tensor and what to fix."""


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What one rank read; `bytes_read` counts tensor bytes as stored in the checkpoint."""

    bytes_read: int
    sharded: int
    replicated: int


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """All-gather (and compute with) parameters in `param_dtype`, reduce in float32.

    Official Wan shards with FSDP1 `MixedPrecision(param_dtype=bf16, reduce_dtype=float32)`: the
    all-gathers move half the bytes of float32. Inputs are not cast (`cast_forward_inputs=False`,
    as FSDP1 for non-root modules): a block's float32 residual stream must stay float32.
    """
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def _kept_dtype_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if m is not module and getattr(m, "fsdp_keep_dtype", False)]


def shard_modules(modules: Iterable[nn.Module], mesh: DeviceMesh | None, *,
                  reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None) -> int:
    """`fully_shard` each module over a 1-D mesh (the sp group); returns how many were sharded.

    Call on a model built on the meta device, before `load_sharded`. A missing or size-1 mesh
    shards nothing, so single-rank and dp-only runs go through the same code. `param_dtype`: the
    dtype parameters are all-gathered and used in (None: as stored); shards stay as stored.
    Submodules marked `fsdp_keep_dtype` (8-bit quantized layers) form one extra unit per module
    whose parameters are all-gathered as stored, never cast to `param_dtype`.
    """
    if mesh is None or mesh.size() == 1:
        return 0
    if mesh.ndim != 1:
        raise ValueError(f"shard_modules takes a 1-D mesh (e.g. ParallelMesh.submesh('sp')), got {mesh.ndim}-D")
    count = 0
    for module in modules:
        keep = _kept_dtype_modules(module)
        if keep:  # one unit for them, all-gathered as stored (8-bit weights stay 8-bit on the wire)
            fully_shard(keep, mesh=mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=mixed_precision(None))
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=mixed_precision(param_dtype))
        count += 1
    return count


class SequentialStack(nn.Module):
    """Calls its modules in order, `x = m(x, *args)`: the FSDP2 root over separately sharded blocks.

    FSDP2's explicit forward prefetch (all-gather block i+1 while block i computes) needs a root
    FSDP module whose forward runs the blocks; a caller that invokes blocks one by one has none,
    and each block then is its own root with no shared communication state. The stack owns no
    parameters; the blocks stay where they are (the model's state dict is unchanged).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        super().__init__()
        self.stack = nn.ModuleList(modules)

    def forward(self, x: Tensor, *args: object) -> Tensor:
        for module in self.stack:
            x = module(x, *args)
        return x


def shard_stack(modules: Iterable[nn.Module], mesh: DeviceMesh | None, *,
                param_dtype: torch.dtype | None = None) -> SequentialStack | None:
    """`shard_modules` the blocks, then a parameterless FSDP2 root over them that prefetches each
    next block's all-gather during the current block's forward. None when nothing was sharded."""
    blocks = list(modules)
    if shard_modules(blocks, mesh, param_dtype=param_dtype) == 0:
        return None
    stack = SequentialStack(blocks)
    fully_shard(stack, mesh=mesh, mp_policy=mixed_precision(param_dtype))
    for current, following in zip(blocks, blocks[1:]):
        # the next block's own unit and, when it has one, its unit of as-stored (8-bit) layers
        current.set_modules_to_forward_prefetch([following, *_kept_dtype_modules(following)[:1]])
    return stack


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) that FSDP2 gives `rank` of `world`: torch.chunk sizes, trailing ranks may be empty."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _local_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _read_shard(name: str, target: DTensor, source: RowSource) -> Tensor:
    if tuple(target.placements) != (Shard(0),):
        raise ShardedLoadError(f"{name}: only dim-0 FSDP shards can be loaded, got placements {target.placements}")
    mesh = target.device_mesh
    start, stop = shard_rows(target.shape[0], mesh.get_local_rank(), mesh.size())
    expected = (stop - start, *target.shape[1:])
    if tuple(target.to_local().shape) != expected:
        # FSDP2 changed how it splits dim 0; reading our formula's rows would load wrong weights.
        raise RuntimeError(f"{name}: FSDP2 local shard is {tuple(target.to_local().shape)} but rows "
                           f"[{start}, {stop}) were computed; update parallel.fsdp.shard_rows for this torch")
    return source.get_slice(name, start, stop)


def _owned_groups(model: nn.Module, keys: Iterable[str]) -> tuple[list[tuple[str, nn.Module, list[str]]], list[str]]:
    """Keys grouped by the `fully_shard`-ed module that owns them, and the root's own keys."""
    owners = sorted(((name, m) for name, m in model.named_modules() if name and isinstance(m, FSDPModule)),
                    key=lambda nm: -len(nm[0]))
    groups: dict[str, list[str]] = {name: [] for name, _ in owners}
    root: list[str] = []
    for key in keys:
        owner = next((name for name, _ in owners if key.startswith(name + ".")), None)
        (groups[owner] if owner is not None else root).append(key)
    return [(name, m, groups[name]) for name, m in owners if groups[name]], root


def load_sharded(model: nn.Module, source: RowSource, *, device: torch.device | str = "cpu") -> LoadStats:
    """Fill a meta-built (optionally `shard_modules`-ed) model from `source`; returns what was read.

    Sharded parameters get this rank's rows only; replicated parameters and persistent buffers
    are read whole onto `device`. Values are cast to the dtype the model was built with. One
    sharded module is loaded at a time, so the transient copies FSDP2 makes while it takes the
    rows over never exceed one block.
    """
    device = torch.device(device)
    targets = model.state_dict(keep_vars=True)
    available = set(source.keys())
    missing = [k for k in targets if k not in available]
    if missing:
        raise ShardedLoadError(f"checkpoint lacks {len(missing)} model tensor(s), e.g. {missing[:3]}; "
                               "check the key map or the checkpoint")
    # mmap-backed sources hand out views of the file: copy so no module keeps the file mapped
    copy = not getattr(source, "fresh_tensors", False)
    stats = {"bytes": 0, "sharded": 0, "replicated": 0}

    def value_of(name: str) -> Tensor:
        target = targets[name]
        stored = tuple(source.shape(name))
        if stored != tuple(target.shape):
            raise ShardedLoadError(f"{name}: checkpoint shape {stored} != model shape {tuple(target.shape)}; "
                                   "the model config does not match this checkpoint")
        if isinstance(target, DTensor):
            rows = _read_shard(name, target, source)
            stats["bytes"] += rows.numel() * rows.element_size()
            local = rows.to(device=_local_device(target.device_mesh), dtype=target.dtype, copy=copy)
            value: Tensor = DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                               shape=target.shape, stride=target.stride())
            stats["sharded"] += 1
        else:
            whole = source.get(name)
            stats["bytes"] += whole.numel() * whole.element_size()
            value = whole.to(device=device, dtype=target.dtype, copy=copy)
            stats["replicated"] += 1
        return nn.Parameter(value, requires_grad=target.requires_grad) if isinstance(target, nn.Parameter) else value

    groups, root = _owned_groups(model, targets)
    for prefix, module, keys in groups:
        # not strict: a unit nested inside (8-bit layers of a block) loads its own keys; any key
        # nobody loaded is caught by the meta check below
        result = module.load_state_dict({k[len(prefix) + 1:]: value_of(k) for k in keys}, strict=False, assign=True)
        if result.unexpected_keys:
            raise ShardedLoadError(f"unexpected tensors {result.unexpected_keys[:3]} while loading {prefix}")
    result = model.load_state_dict({k: value_of(k) for k in root}, strict=False, assign=True)
    if result.unexpected_keys:
        raise ShardedLoadError(f"unexpected tensors {result.unexpected_keys[:3]} while loading the root")
    # (loading onto meta itself, as `plan --dry-run` does, leaves nothing to check)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta and device.type != "meta"]
    if left:
        raise ShardedLoadError(f"{len(left)} tensor(s) are still on the meta device after loading, e.g. {left[:3]} "
                               "(non-persistent buffers?); create them on a real device before load_sharded")
    return LoadStats(bytes_read=stats["bytes"], sharded=stats["sharded"], replicated=stats["replicated"])
