"""`calibrate --prompts FILE [--seeds ...]`: a prompt file (batch format) x seeds as calibration runs.

The runs themselves (one model load, curves averaged with their spread) are
`launcher.engine.calibration`; this module only turns the file and flags into them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.batch.items import read_items
from launcher.config import RunConfig, run_config_from_flags
from launcher.errors import UsageError
from launcher.engine.calibration import CalibrationRun, run_calibration


def calibrate_prompt_file(prompts: Path, seeds: str | None, flags: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """Check every line, then record and average; returns what the output rank wrote."""
    config, runs = calibration_runs(prompts, seeds, flags)
    return run_calibration(config, runs, out)


def calibration_runs(prompts: Path, seeds: str | None, flags: dict[str, Any]) -> tuple[RunConfig, list[CalibrationRun]]:
    """The prompt file x seeds as calibration runs; every line checked like a generate (exit 2 on the first bad one)."""
    if flags.get("prompt") is not None:
        raise UsageError("give --prompt or --prompts FILE, not both")
    items = read_items(prompts)
    seed_list = parse_int_list(seeds, "--seeds") if seeds is not None else None
    # a line's prompt, image and seed; size, frames and steps are the command line's, shared by every
    # run (one table describes one schedule)
    configs = [run_config_from_flags(dict(flags, prompt=item.prompt, image=item.image or flags.get("image")),
                                     calibration=True) for item in items]
    modes = {c.ratio_table_key for c in configs}
    if len(modes) > 1:
        raise UsageError(f"{prompts}: some lines have an image and some not ({' and '.join(sorted(modes))} tables); "
                         "calibrate each mode with its own file")
    runs = []
    for item, config in zip(items, configs):
        for seed in seed_list if seed_list is not None else [item.seed if item.seed is not None else config.base_seed]:
            runs.append(CalibrationRun(prompt=config.prompt, image=config.image, seed=seed))
    return configs[0], runs


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give integers separated by commas, e.g. 1,2,3") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{flag} {text!r}: give one or more seeds >= 0, e.g. 1,2,3")
    return values
