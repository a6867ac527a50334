"""launcher.engine.host_memory: host bytes predicted from the meta-built modules, before any load,
decide pinned / pageable (one warning) / exit 2 naming the flags that help."""
from __future__ import annotations

import logging

import pytest
import torch

from launcher.checkpoint import inspect_checkpoint
from launcher.checkpoint.load import build_transformer_on_meta, load_transformer
from launcher.config import UsageError
from launcher.engine.host_memory import PIN_MARGIN_BYTES, HostMemory, decide_pinning, module_bytes
from launcher.wan.threads import ranks_per_node
from launcher.wan.tasks import TASKS

GIB = 2**30


def test_prediction_from_meta_equals_the_loaded_weights(tiny_ckpt):
    info = inspect_checkpoint(tiny_ckpt("t2v-A14B"), TASKS["t2v-A14B"])
    for dtype in (torch.float32, torch.bfloat16):
        predicted = module_bytes(build_transformer_on_meta(info, "high", dtype))
        loaded = load_transformer(info, "high", dtype=dtype, device="cpu")
        assert predicted == module_bytes(loaded) > 0


def test_fits_with_margin_pins(caplog):
    free = HostMemory(available=100 * GIB, swap_free=0)
    assert decide_pinning(90 * GIB, free, pin=True, helps=["x"])
    assert not decide_pinning(90 * GIB, free, pin=False, helps=["x"])  # no CUDA: nothing to pin
    assert not caplog.records


def test_inside_the_margin_falls_back_to_pageable_with_one_warning(caplog):
    free = HostMemory(available=100 * GIB, swap_free=0)
    with caplog.at_level(logging.WARNING):
        assert not decide_pinning(100 * GIB - PIN_MARGIN_BYTES + 1, free, pin=True, helps=["--convert_model_dtype"])
    assert len(caplog.records) == 1 and "--convert_model_dtype" in caplog.records[0].getMessage()


def test_swap_still_holds_pageable_memory():
    assert not decide_pinning(110 * GIB, HostMemory(available=100 * GIB, swap_free=20 * GIB), pin=True, helps=["x"])


def test_does_not_fit_at_all_is_a_usage_error_naming_the_flags():
    with pytest.raises(UsageError, match=r"needs 163\.0 GiB .* 117\.0 GiB are available.*--convert_model_dtype"):
        decide_pinning(163 * GIB, HostMemory(available=117 * GIB, swap_free=0), pin=True,
                       helps=["--convert_model_dtype (half the bytes)"])


def test_meminfo_and_ranks_per_node(tmp_path, monkeypatch):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 1000 kB\nMemAvailable:   2048 kB\nSwapFree: 1 kB\n")
    assert HostMemory.read(f) == HostMemory(available=2048 * 1024, swap_free=1024)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert ranks_per_node() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert ranks_per_node() == 8
