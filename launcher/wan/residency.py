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
"""
from __future__ import annotations

import logging

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


def _pinned(t: torch.Tensor, pin: bool) -> torch.Tensor:
    host = t.detach().to("cpu")
    if not pin:
        return host
    try:
        return host.pin_memory()
    except RuntimeError as err:  # pinnable memory is capped on some hosts: fall back to pageable copies
        log.warning("could not pin %.1f MiB of expert weights (%s); swaps use pageable memory",
                    host.numel() * host.element_size() / 2**20, err)
        return host


class HostResident:
    """One module whose weights' home is host memory; `to(device)` moves them, `to_host()` returns."""

    def __init__(self, module: nn.Module, *, pin: bool | None = None) -> None:
        self.module = module
        pin = torch.cuda.is_available() if pin is None else pin
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        for owner, name, kind, t in _tensors(module):
            host = _pinned(t, pin)
            self._host[(id(owner), name)] = host
            _assign(owner, name, kind, t, host)
        self.device = torch.device("cpu")
        self.pinned = pin and all(h.is_pinned() for h in self._host.values())

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
