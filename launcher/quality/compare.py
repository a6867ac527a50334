"""`magcache-launch compare A B`: every check that can fail fast runs before a frame is decoded."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.config import check_output_location
from launcher.quality.frames import load_frames
from launcher.quality.metrics import Comparison, check_comparable, compare_frames


def run_compare(a: Path, b: Path, *, as_json: bool = False, plot: Path | None = None,
                lpips_weights: Path | None = None) -> Comparison:
    """Measure B against reference A; print the table (or one JSON object) on stdout."""
    if plot is not None:
        check_output_location(plot, "--plot")
    lpips = None
    if lpips_weights is not None:
        from launcher.quality.lpips import load_lpips

        lpips = load_lpips(lpips_weights)  # bad weight files fail here, before any decoding
    frames_a, frames_b = load_frames(a), load_frames(b)
    check_comparable(frames_a, frames_b, with_lpips=lpips is not None)  # before the note: one line on error
    if lpips is None and frames_a.kind == "pixels":
        from launcher.quality.lpips_files import SKIPPED

        print(SKIPPED, file=sys.stderr)
    comparison = compare_frames(frames_a, frames_b, lpips=lpips)
    if as_json:
        print(json.dumps(comparison.to_json()))
    else:
        from launcher.quality.table import print_comparison

        print_comparison(comparison, a=str(a), b=str(b))
    if plot is not None:
        from launcher.quality.plot import plot_per_frame

        plot_per_frame(comparison, plot)
    return comparison
