"""launcher.wan.residency: an expert's host home is made once; moves never copy weights back.

CPU-only machines have no second device and no pinned memory, so the "GPU" here is the meta
device: moving there drops the data, and coming home must restore every value without a copy.
"""
from __future__ import annotations

import torch
from torch import nn

from launcher.wan.residency import HostResident, rounded_bytes


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    m.register_buffer("table", torch.randn(3), persistent=False)
    return m


def test_round_trip_keeps_values_and_reuses_the_host_copy():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()} | {"table": model.table.clone()}
    home = HostResident(model, pin=False)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert home.device == torch.device("cpu") and not home.pinned
    assert home.host_bytes == sum(t.numel() * t.element_size() for t in before.values())
    for _ in range(2):
        home.to("meta")
        assert all(p.device.type == "meta" for p in model.parameters()) and model.table.device.type == "meta"
        home.to("cpu")
        # no copy back: the parameters point at the very same host storage again
        assert [p.data_ptr() for p in model.parameters()] == ptrs
    after = {k: v for k, v in model.state_dict().items()} | {"table": model.table}
    assert all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), _model()(x))


def test_moving_to_the_current_device_is_a_no_op():
    model = _model()
    home = HostResident(model, pin=False)
    ptr = model[0].weight.data_ptr()
    home.to("cpu")
    assert model[0].weight.data_ptr() == ptr


def test_pinning_registers_each_storage_once_without_rounding():
    """Each distinct host storage is handed to the pin function once, at its own size: the bytes
    pinned equal the weight bytes (Tensor.pin_memory would round every block to a power of two)."""
    model = _model()
    tied = nn.Linear(16, 16)
    model.add_module("tied", tied)
    model.tied.bias = model[1].bias  # one storage under two names
    seen: list[int] = []

    def count(t: torch.Tensor) -> int:
        seen.append(t.untyped_storage().data_ptr())
        return t.untyped_storage().nbytes()

    home = HostResident(model, pin=count)
    weights = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
               for p in [*model.parameters(), *model.buffers()]} | {model.table.data_ptr(): model.table.nbytes}
    assert sorted(seen) == sorted(weights) and home.pinned
    assert home.pinned_bytes == home.storage_bytes == sum(weights.values())
    assert rounded_bytes(weights.values()) > home.pinned_bytes  # what the caching allocator would have taken


def test_rounded_bytes_is_the_caching_allocators_power_of_two():
    ffn = 13824 * 5120 * 2  # an A14B FFN weight in bf16: 135 MiB
    assert rounded_bytes([ffn]) == 256 * 2**20
    assert rounded_bytes([4096, 4097, 0]) == 4096 + 8192


def test_a_refused_pin_leaves_pageable_memory_and_warns_once(caplog):
    model = _model()
    calls = []
    home = HostResident(model, pin=lambda t: calls.append(t) or 0)
    assert len(calls) == 1 and not home.pinned and home.pinned_bytes == 0
    assert sum("could not pin" in r.message for r in caplog.records) == 1
    home.to("meta")
    home.to("cpu")
    x = torch.randn(2, 8)
    assert torch.equal(model(x), _model()(x))
