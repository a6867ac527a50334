"""The console view of a Comparison: one row per frame, a mean row, then the headline."""
from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.quality.metrics import Comparison


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def print_comparison(c: Comparison, *, a: str, b: str, out: Console | None = None) -> None:
    """Per-frame table and mean row on stdout, then the headline line and what the numbers mean."""
    out = out or Console(file=sys.stdout, highlight=False)
    table = Table(title=f"B = {escape(b)}\nvs A = {escape(a)}", caption="* the headline" if c.kind == "pixels" else None)
    if c.kind == "pixels":
        cols = [("PSNR dB", c.psnr, c.mean_psnr, 2), ("SSIM luma*", c.ssim_luma, c.mean_ssim_luma, 4),
                ("SSIM RGB", c.ssim_rgb, c.mean_ssim_rgb, 4), ("flicker", c.flicker, c.mean_flicker, 3)]
        if c.lpips is not None:
            cols.append(("LPIPS", c.lpips, c.mean_lpips, 4))
    else:
        cols = [("MSE", c.mse, c.mean_mse, 6), ("PSNR dB", c.psnr, c.mean_psnr, 2), ("cosine", c.cosine, c.mean_cosine, 6)]
    table.add_column("frame", justify="right")
    for name, *_ in cols:
        table.add_column(name, justify="right")
    for t in range(c.frames):
        table.add_row(str(t), *(_fmt(values[t] if values else None, d) for _, values, _, d in cols))
    table.add_section()
    table.add_row("mean", *(_fmt(mean, d) for _, _, mean, d in cols), style="bold")
    out.print(table)
    for line in headline_lines(c):
        out.print(line, soft_wrap=True)


def headline_lines(c: Comparison) -> list[str]:
    """The summary a user quotes, each line whole (a terminal wraps nothing mid-clause)."""
    if c.kind == "pixels":
        lines = [(f"[bold]headline: SSIM (luma, BT.601) {_fmt(c.mean_ssim_luma, 4)}[/]  (1 = identical; "
                  f"SSIM RGB {_fmt(c.mean_ssim_rgb, 4)}, PSNR {_fmt(c.mean_psnr, 2)} dB)")]
        if c.mean_flicker is not None:
            lines.append(f"flicker {_fmt(c.mean_flicker, 3)}: mean |change of B between frames - change of A|, "
                         "luma 0-255; 0 = B moves from frame to frame exactly as A does")
        if c.lpips is not None:
            lines.append(f"LPIPS (AlexNet, v0.1) {_fmt(c.mean_lpips, 4)}: 0 = identical, lower is closer")
    else:
        lines = [(f"[bold]headline: latent PSNR {_fmt(c.mean_psnr, 2)} dB[/]  (peak = max |A| = {c.psnr_peak:.4g}; "
                  f"cosine {_fmt(c.mean_cosine, 6)}, MSE {_fmt(c.mean_mse, 6)})")]
    if c.identical:
        lines.append("B is identical to A: every value is equal (PSNR inf)")
        return lines
    differ = [p for p in c.psnr if not math.isinf(p)]
    if len(differ) < c.frames:  # a mean of inf (and an SSIM that rounds to 1) must not read as "identical"
        lines.append(f"B is NOT identical to A: {len(differ)} of {c.frames} frames differ (PSNR "
                     f"{sum(differ) / len(differ):.2f} dB over those); the other {c.frames - len(differ)} are "
                     "identical (PSNR inf), so the mean PSNR is inf")
    else:
        lines.append("B is not identical to A: every frame differs")
    return lines
