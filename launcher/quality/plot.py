"""Per-frame curves as a PNG, to see where in the video B drifts from A."""
from __future__ import annotations

import math
from pathlib import Path

from launcher.outputs.atomic import atomic_path
from launcher.quality.metrics import Comparison


def plot_per_frame(comparison: Comparison, path: str | Path) -> Path:
    """PSNR and SSIM-luma per frame (LPIPS too when measured; cosine for latents), written atomically.

    Identical frames have infinite PSNR; they are left out of the PSNR curve and named in its title.
    """
    from matplotlib.figure import (
        Figure,  # Figure without pyplot: Agg, no global backend state
    )

    c = comparison
    frames = list(range(c.frames))
    panels: list[tuple[str, list[float | None]]] = [("PSNR (dB)", list(c.psnr))]
    if c.kind == "pixels":
        panels.append(("SSIM luma (headline)", list(c.ssim_luma or [])))
        if c.lpips is not None:
            panels.append(("LPIPS", list(c.lpips)))
    else:
        panels.append(("cosine similarity", list(c.cosine or [])))
    fig = Figure(figsize=(10, 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, values) in zip(axes, panels):
        ys = [math.nan if v is None or math.isinf(v) else v for v in values]
        ax.plot(frames, ys, marker="o", markersize=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    inf_frames = [t for t, p in enumerate(c.psnr) if math.isinf(p)]
    if inf_frames:
        axes[0].set_title(f"identical frames (PSNR inf, not drawn): {len(inf_frames)} of {c.frames}", fontsize="small")
    axes[-1].set_xlabel("frame")
    name, value = c.headline
    fig.suptitle(f"B vs A, {c.kind}: mean {name} {value if value is None else round(value, 4)}")
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
