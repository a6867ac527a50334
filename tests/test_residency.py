"""launcher.wan.residency: an expert's host home is made once; moves never copy weights back.

CPU-only machines have no second device and no pinned memory, so the "GPU" here is the meta
device: moving there drops the data, and coming home must restore every value without a copy.
"""
from __future__ import annotations

import torch
from torch import nn

from launcher.wan.residency import HostResident


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
