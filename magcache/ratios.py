"""Magnitude-ratio tables: the published MagCache4Wan2.2 ones (bundled) and calibrated files.

A table holds, per forward after the first step, the mean ratio ||r_t|| / ||r_{t-1}|| of the
block residuals, interleaved [cond, uncond]. `mag_ratios` turns it into the per-forward list
the schedule reads, exactly as upstream: `[1, 1] + ratios`, nearest-interpolated per branch
when the step count differs from the calibration.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

#: a checkpoint folder may carry its own calibrated table under this name (`calibrate --out`'s default):
#: runs on that checkpoint use it unless --magcache_ratios names another file
CHECKPOINT_RATIO_FILE = "magcache_ratios.json"

#: bundled table keys; ti2v-5B has one table for text-only runs and one for runs with an image
BUNDLED_KEYS: tuple[str, ...] = ("t2v-A14B", "i2v-A14B", "ti2v-5B/t2v", "ti2v-5B/i2v")


class RatioTableError(ValueError):
    """A ratio table that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True, slots=True)
class RatioTable:
    """One calibration: ratios (and optionally their stds and cosine distances) per forward."""

    key: str
    sample_steps: int
    sample_shift: float
    ratios: tuple[float, ...]
    stds: tuple[float, ...] | None = None
    cos_dists: tuple[float, ...] | None = None
    #: "bundled" or the path the table was read from (goes into the manifest)
    source: str = "bundled"
    #: how a calibrated table was made (solver, LoRAs, prompts...), as `calibrate` records it
    meta: dict[str, Any] | None = None

    def mag(self, steps: int) -> list[float]:
        """Per-forward ratios for a run of `steps` steps."""
        return mag_ratios(self.ratios, steps)


def table_key(task: str, with_image: bool = False) -> str:
    """Bundled table for a task; ti2v-5B's depends on whether an image conditions the run."""
    key = f"{task}/{'i2v' if with_image else 't2v'}" if task == "ti2v-5B" else task
    if key not in BUNDLED_KEYS:
        raise RatioTableError(
            f"no bundled MagCache ratios for task {task!r}; use one of t2v-A14B, i2v-A14B, ti2v-5B "
            "or pass a calibrated file")
    return key


def checkpoint_ratio_file(ckpt_dir: str | Path | None) -> Path | None:
    """The table shipped in a checkpoint folder (CHECKPOINT_RATIO_FILE), or None."""
    if ckpt_dir is None:
        return None
    path = Path(ckpt_dir) / CHECKPOINT_RATIO_FILE
    return path if path.is_file() else None


def bundled_table(key: str) -> RatioTable:
    """A published table by key (see BUNDLED_KEYS), read from the package data."""
    if key not in BUNDLED_KEYS:
        raise RatioTableError(f"no bundled MagCache ratios named {key!r}; use one of {', '.join(BUNDLED_KEYS)}")
    text = resources.files("magcache").joinpath("data", "magcache_ratios.json").read_text(encoding="utf-8")
    return parse_table({"task": key, **json.loads(text)[key]}, source="bundled")


def load_ratio_file(path: str | Path, task: str | None = None) -> RatioTable:
    """A calibrated table as `magcache.calibrate.write_ratio_file` writes it.

    `task` (e.g. "ti2v-5B") must match the file's task when given: ratios of another model
    would silently pick wrong forwards to skip.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RatioTableError(f"ratio file {path} does not exist; check the path or run calibration") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RatioTableError(f"cannot read ratio file {path} ({exc}); check the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RatioTableError(f"ratio file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                              "regenerate it with calibration") from None
    table = parse_table(data, source=str(path))
    if task is not None and table.key.split("/")[0] != task.split("/")[0]:
        raise RatioTableError(f"ratio file {path} was calibrated for {table.key}, not {task}; "
                              f"calibrate {task} or pass its own file")
    return table


def parse_table(data: Any, source: str) -> RatioTable:
    """Validate a decoded table (a dict with task, sample_steps, sample_shift, ratios...)."""
    where = "bundled ratio table" if source == "bundled" else f"ratio file {source}"
    if not isinstance(data, dict):
        raise RatioTableError(f"{where} must be a JSON object with task, sample_steps, sample_shift and ratios")
    task = data.get("task")
    if not isinstance(task, str) or not task:
        raise RatioTableError(f"{where} has no 'task' name; add the task it was calibrated for")
    steps = data.get("sample_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise RatioTableError(f"{where} needs an integer 'sample_steps' >= 2, got {steps!r}")
    shift = data.get("sample_shift")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise RatioTableError(f"{where} needs a numeric 'sample_shift', got {shift!r}")
    ratios = _numbers(data.get("ratios"), "ratios", where)
    if ratios is None or not ratios:
        raise RatioTableError(f"{where} has no 'ratios'; it needs one value per forward after the first step")
    if len(ratios) % 2:
        raise RatioTableError(f"{where} has an odd number of ratios ({len(ratios)}); "
                              "they must interleave cond and uncond")
    if len(ratios) != 2 * (steps - 1):
        raise RatioTableError(f"{where} has {len(ratios)} ratios but sample_steps {steps} needs "
                              f"{2 * (steps - 1)}; regenerate it")
    extras = {}
    for name in ("stds", "cos_dists"):
        values = _numbers(data.get(name), name, where)
        if values is not None and len(values) != len(ratios):
            raise RatioTableError(f"{where} has {len(values)} {name} for {len(ratios)} ratios; regenerate it")
        extras[name] = values
    meta = data.get("meta")
    return RatioTable(key=task, sample_steps=steps, sample_shift=float(shift), ratios=ratios,
                      stds=extras["stds"], cos_dists=extras["cos_dists"], source=source,
                      meta=meta if isinstance(meta, dict) else None)


def table_warnings(table: RatioTable, *, shift: float, solver: str, loras: Sequence[str] = ()) -> list[str]:
    """Where a calibrated table was made under other settings than the run it now drives.

    The ratio curve follows the noise schedule (shift, solver) and the weights (LoRAs); a table
    made under others still runs, but its skips land where that other run's residuals were calm.
    Step counts are covered by the plan's interpolation warning.
    """
    if table.source == "bundled":
        return []
    out = []
    if not math.isclose(table.sample_shift, shift, rel_tol=1e-9, abs_tol=1e-9):
        out.append(f"ratio file {table.source} was calibrated at shift {table.sample_shift:g}, this run uses "
                   f"{shift:g}; calibrate at this shift for reliable skips")
    made = table.meta or {}
    if "sample_solver" in made and made["sample_solver"] != solver:
        out.append(f"ratio file {table.source} was calibrated with the {made['sample_solver']} solver, this run "
                   f"uses {solver}; calibrate with {solver} for reliable skips")
    if "loras" in made and sorted(map(str, made["loras"])) != sorted(map(str, loras)):
        theirs = ", ".join(map(str, made["loras"])) or "none"
        ours = ", ".join(map(str, loras)) or "none"
        out.append(f"ratio file {table.source} was calibrated with LoRAs {theirs}, this run has {ours}; "
                   "calibrate with the LoRAs you generate with")
    return out


def _numbers(values: Any, name: str, where: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if not isinstance(values, list):
        raise RatioTableError(f"{where}: '{name}' must be a list of numbers")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RatioTableError(f"{where}: '{name}'[{i}] is {v!r}, not a finite number; regenerate the file")
    return tuple(float(v) for v in values)


def nearest_interp(values: Sequence[float], length: int) -> list[float]:
    """Upstream `nearest_interp`: indices `round(i*(L-1)/(length-1))`, round half to even.

    Python's round() on a float is half-to-even like `np.round`, and `i*scale` is the same
    IEEE product numpy forms, so the indices match upstream exactly.
    """
    if length < 1:
        raise RatioTableError(f"cannot interpolate ratios to {length} steps; use at least 1 step")
    if length == 1:
        return [values[-1]]  # upstream's special case: the last (most denoised) ratio
    scale = (len(values) - 1) / (length - 1)
    return [values[round(i * scale)] for i in range(length)]


def mag_ratios(ratios: Sequence[float], steps: int) -> list[float]:
    """Per-forward ratios for `steps` steps: `[1, 1] + ratios`, per-branch interpolated if needed."""
    if len(ratios) % 2:
        raise RatioTableError(f"{len(ratios)} ratios cannot interleave cond and uncond; use an even count")
    mag = [1.0, 1.0] + [float(r) for r in ratios]
    if len(mag) == 2 * steps:
        return mag
    cond = nearest_interp(mag[0::2], steps)
    uncond = nearest_interp(mag[1::2], steps)
    return [v for pair in zip(cond, uncond) for v in pair]
