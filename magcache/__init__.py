"""MagCache for Wan2.2: the upstream rule (schedule), ratio tables, plans, and the torch side.

Importing the package stays torch-free so `plan` and config validation run without torch;
the controller and calibration names are loaded on first use.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from magcache.plan import Decision, Plan, plan
from magcache.ratios import (
    BUNDLED_KEYS,
    RatioTable,
    RatioTableError,
    bundled_table,
    load_ratio_file,
    mag_ratios,
    table_key,
)
from magcache.schedule import (
    MagCacheParams,
    MagCacheSchedule,
    Proposal,
    build_schedule,
    split_forwards,
    upstream_timesteps,
)

_LAZY = {
    "MagCacheController": "magcache.controller",
    "ComputeAll": "magcache.controller",
    "CalibrationRecorder": "magcache.calibrate",
    "write_ratio_file": "magcache.calibrate",
    "plot_calibration": "magcache.calibrate",
}

__all__ = [
    "BUNDLED_KEYS", "Decision", "MagCacheParams", "MagCacheSchedule", "Plan", "Proposal",
    "RatioTable", "RatioTableError", "build_schedule", "bundled_table", "load_ratio_file",
    "mag_ratios", "plan", "split_forwards", "table_key", "upstream_timesteps", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'magcache' has no attribute {name!r}")
