"""Experts that live in host memory and visit the GPU (official `offload_model` / `init_on_cpu`).

Official moves an expert with `model.to("cpu")` / `model.to(device)` at every switch: each move to
the CPU allocates pageable host tensors and copies the weights back although they never changed,
and each move to the GPU copies from pageable memory (the driver stages it through a pinned
buffer). Here every weight keeps one host copy, pinned when CUDA is present, made once at load:
- to the GPU: `copy(non_blocking=True)` from pinned memory, DMA without a staging copy, queued on
  the current stream so the expert's first kernels wait for their weights;
- to the host: the parameters point at their host copy again and the GPU tensors are released
  (the caching allocator reuses their memory only for work queued after them): no copy at all.
Values are bit-identical to official's moves; only the time of a switch changes.

Pinning registers the loaded host storage in place (`cudaHostRegister`) and never copies:
`Tensor.pin_memory()` goes through torch's CachingHostAllocator, which rounds every block up to a
power of two (a [13824, 5120] bf16 FFN weight, 135 MiB, takes 256 MiB; 1.53x an A14B expert's
weights). `rounded_bytes` says what that rule would have cost, `pinned_bytes` what this costs.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner, attribute, kind, tensor) for every parameter and buffer, non-persistent ones included."""
    out = []
    for owner in module.modules():
        out += [(owner, name, "param", p) for name, p in owner._parameters.items() if p is not None]
        out += [(owner, name, "buffer", b) for name, b in owner._buffers.items() if b is not None]
    return out


def _assign(owner: nn.Module, name: str, kind: str, current: torch.Tensor, new: torch.Tensor) -> None:
    """Point a parameter/buffer at `new`, keeping the Parameter object where the tensor types allow
    (CPU <-> CUDA do), else replacing it as `nn.Module._apply` does (e.g. the meta device)."""
    if torch._has_compatible_shallow_copy_type(current, new):
        current.data = new
    elif kind == "param":
        owner._parameters[name] = nn.Parameter(new, requires_grad=current.requires_grad)
    else:
        owner._buffers[name] = new


#: pins a host tensor's storage where it lies and returns the bytes pinned (0: could not pin)
PinFn = Callable[[torch.Tensor], int]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def register_in_place(t: torch.Tensor) -> int:
    """`cudaHostRegister` the tensor's whole storage (no copy, no rounding); 0 where CUDA refuses."""
    ptr, size = _storage(t)
    if size == 0:
        return 0
    cudart = torch.cuda.cudart()
    return size if int(cudart.cudaHostRegister(ptr, size, 0)) == 0 else 0


def _unregister(ptrs: list[int]) -> None:
    cudart = torch.cuda.cudart()
    for ptr in ptrs:
        cudart.cudaHostUnregister(ptr)


def rounded_bytes(nbytes: Iterable[int]) -> int:
    """Host bytes `Tensor.pin_memory()` would take for these blocks: each rounded up to a power of two
    (torch's CachingHostAllocator with its default unlimited `pinned_max_round_threshold`)."""
    return sum(1 << (n - 1).bit_length() if n > 0 else 0 for n in nbytes)


class HostResident:
    """One module whose weights' home is host memory; `to(device)` moves them, `to_host()` returns.

    `pin`: True registers each host storage in place with CUDA (`register_in_place`), False leaves
    it pageable, a function pins with that function (tests count the bytes it is given).
    """

    def __init__(self, module: nn.Module, *, pin: bool | PinFn | None = None) -> None:
        self.module = module
        if pin is None:
            pin = torch.cuda.is_available()
        pin_fn: PinFn | None = register_in_place if pin is True else (pin or None)
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        storages: dict[int, torch.Tensor] = {}
        for owner, name, kind, t in _tensors(module):
            host = t.detach().to("cpu")
            self._host[(id(owner), name)] = host
            _assign(owner, name, kind, t, host)
            if host.untyped_storage().nbytes():
                # tied weights share one storage: pinned once (keyed by the storage itself, not its
                # address, which a dry run's fake tensors do not have)
                storages.setdefault(host.untyped_storage()._cdata, host)
        #: bytes of the distinct host storages (what pinning them in place costs)
        self.storage_bytes = sum(_storage(h)[1] for h in storages.values())
        #: bytes actually pinned (equal to storage_bytes when every storage was pinned)
        self.pinned_bytes = 0
        registered: list[int] = []
        if pin_fn is not None:
            for host in storages.values():
                got = pin_fn(host)
                if not got:
                    log.warning("could not pin %.1f MiB of expert weights; swaps use pageable memory",
                                self.storage_bytes / 2**20)
                    break
                registered.append(_storage(host)[0])
                self.pinned_bytes += got
        if registered and pin_fn is register_in_place:
            weakref.finalize(self, _unregister, registered)
        self.device = torch.device("cpu")
        self.pinned = pin_fn is not None and self.pinned_bytes == self.storage_bytes > 0

    def to(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device == self.device:
            return
        if device.type == "cpu":
            self.to_host()
            return
        for owner, name, kind, t in _tensors(self.module):
            _assign(owner, name, kind, t, self._host[(id(owner), name)].to(device, non_blocking=True))
        self.device = device

    def to_host(self) -> None:
        for owner, name, kind, t in _tensors(self.module):
            _assign(owner, name, kind, t, self._host[(id(owner), name)])
        self.device = torch.device("cpu")

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host.values())
