"""Frame-by-frame distances between a reference A and a candidate B, in numpy float64.

Pixels (uint8 RGB): PSNR (peak 255), SSIM on luma (the headline) and on RGB, and a temporal
flicker score. Latents: MSE, PSNR against the reference's own peak, cosine similarity; no SSIM
(latent channels are not an image). Pure numpy so every number can be checked by hand or against
scikit-image; LPIPS, which needs a network, is passed in as a function.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from launcher.errors import UsageError
from launcher.quality.frames import FrameKind, Frames
from launcher.quality.lpips_files import LPIPS_MIN_SIZE

#: BT.601 luma: SSIM was defined on grey-scale images (Wang et al. 2004); Y is the headline's input
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
PIXEL_PEAK = 255.0
#: Wang et al. 2004: 11x11 Gaussian window (sigma 1.5; scipy's truncate 3.5 gives radius 5), K1, K2
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03

#: per-frame LPIPS distances for uint8 [F,H,W,3] A and B (launcher.quality.lpips.Lpips is one)
LpipsFn = Callable[[np.ndarray, np.ndarray], Sequence[float]]


def _mean(values: Sequence[float | None] | None) -> float | None:
    vals = [v for v in values or () if v is not None]
    return float(np.mean(vals)) if vals else None


@dataclass(frozen=True)
class Comparison:
    """B measured against A. Per-frame lists have one entry per frame; fields not measured for
    this kind are None. The headline is SSIM on luma for pixels, PSNR for latents."""

    kind: FrameKind
    #: one input's frames-first shape: [F,H,W,3] (pixels) or [F,C,H,W] (latents)
    shape: tuple[int, ...]
    #: dB per frame; inf where the frame is identical. Peak: `psnr_peak`
    psnr: list[float]
    #: 255 for pixels; max |A| over the whole latent tensor for latents
    psnr_peak: float
    #: every value of B equals A's
    identical: bool
    #: pixels: Gaussian-window SSIM on BT.601 luma, 1 = identical (the headline)
    ssim_luma: list[float] | None = None
    #: pixels: the same SSIM per R, G, B channel, averaged over the channels
    ssim_rgb: list[float] | None = None
    #: pixels: mean |(B[t]-B[t-1]) - (A[t]-A[t-1])| on luma, 0-255 units; None for frame 0
    flicker: list[float | None] | None = None
    #: latents: mean squared difference per frame
    mse: list[float] | None = None
    #: latents: cosine similarity of each frame's flattened [C,H,W] values, 1 = same direction
    cosine: list[float] | None = None
    #: pixels, when weights were given: LPIPS (AlexNet, v0.1), 0 = identical, lower is closer
    lpips: list[float] | None = None

    @property
    def frames(self) -> int:
        return self.shape[0]

    @property
    def mean_psnr(self) -> float:
        """The mean of the per-frame PSNRs: inf if any frame is identical (`identical` says whether all are)."""
        return float(np.mean(self.psnr))

    @property
    def mean_ssim_luma(self) -> float | None:
        return _mean(self.ssim_luma)

    @property
    def mean_ssim_rgb(self) -> float | None:
        return _mean(self.ssim_rgb)

    @property
    def mean_flicker(self) -> float | None:
        """The flicker score: mean over t >= 1; None for a one-frame video (no frame-to-frame change)."""
        return _mean(self.flicker)

    @property
    def mean_mse(self) -> float | None:
        return _mean(self.mse)

    @property
    def mean_cosine(self) -> float | None:
        return _mean(self.cosine)

    @property
    def mean_lpips(self) -> float | None:
        return _mean(self.lpips)

    @property
    def headline(self) -> tuple[str, float | None]:
        """("ssim_luma", mean) for pixels, ("psnr", mean) for latents."""
        if self.kind == "pixels":
            return "ssim_luma", self.mean_ssim_luma
        return "psnr", self.mean_psnr

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; an infinite PSNR (identical frames) becomes null, and `identical` says why."""
        per_frame: dict[str, list[float | None] | None] = {"psnr": self.psnr}
        mean: dict[str, float | None] = {"psnr": self.mean_psnr}
        if self.kind == "pixels":
            per_frame.update(ssim_luma=self.ssim_luma, ssim_rgb=self.ssim_rgb, flicker=self.flicker, lpips=self.lpips)
            mean.update(ssim_luma=self.mean_ssim_luma, ssim_rgb=self.mean_ssim_rgb, flicker=self.mean_flicker,
                        lpips=self.mean_lpips)
        else:
            per_frame.update(mse=self.mse, cosine=self.cosine)
            mean.update(mse=self.mean_mse, cosine=self.mean_cosine)
        name, value = self.headline
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "frames": self.frames,
            "identical": self.identical,
            "headline": {"metric": name, "value": _finite(value)},
            "psnr_peak": _finite(self.psnr_peak),
            "mean": {k: _finite(v) for k, v in mean.items()},
            "per_frame": {k: None if v is None else [_finite(x) for x in v] for k, v in per_frame.items()},
        }


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def compare_frames(a: Frames, b: Frames, lpips: LpipsFn | None = None) -> Comparison:
    """B against reference A, frame by frame. Kinds and shapes must match (UsageError naming both)."""
    check_comparable(a, b, with_lpips=lpips is not None)
    if a.kind == "latents":
        return _compare_latents(a.data, b.data)
    return _compare_pixels(a.data, b.data, lpips)


def check_comparable(a: Frames, b: Frames, *, with_lpips: bool = False) -> None:
    """Every reason the pair cannot be measured, as one line, before any metric runs.

    A shape mismatch names both shapes: it means a wrong file, not a bad score.
    """
    if a.kind != b.kind:
        what = {"pixels": "a video (pixels)", "latents": "latents"}
        raise UsageError(f"A is {what[a.kind]}, B is {what[b.kind]}; compare two videos (mp4 or PNG frames) "
                         "or two --save-latents files")
    if a.data.shape != b.data.shape:
        noun = "videos" if a.kind == "pixels" else "latents"
        raise UsageError(f"A has {a.describe()}, B has {b.describe()}; compare {noun} of one shape")
    if a.kind == "latents":
        if with_lpips:
            raise UsageError("LPIPS compares pixels, and A and B are latents; drop --lpips-weights or compare the videos")
        return
    _, h, w, _ = a.data.shape
    win = 2 * SSIM_RADIUS + 1
    if h < win or w < win:
        raise UsageError(f"frames are {w}x{h}; SSIM's {win}x{win} window needs frames of at least {win}x{win} pixels")
    if with_lpips and (h < LPIPS_MIN_SIZE or w < LPIPS_MIN_SIZE):
        raise UsageError(f"frames are {w}x{h}; LPIPS (AlexNet) needs at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} "
                         "pixels; drop --lpips-weights")


# ----- pixels -----------------------------------------------------------------------------------

def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y = 0.299 R + 0.587 G + 0.114 B of [..., 3] values, float64 in 0-255 (not rounded)."""
    x = rgb.astype(np.float64)
    r, g, bl = LUMA_WEIGHTS
    return r * x[..., 0] + g * x[..., 1] + bl * x[..., 2]


def psnr(mse: float, peak: float) -> float:
    """10 log10(peak^2 / MSE) in dB; inf for MSE 0 (identical)."""
    if mse == 0:
        return math.inf
    if peak == 0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _gaussian_kernel() -> np.ndarray:
    """The 1-D taps of scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5): 11 taps, sum 1."""
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return k / k.sum()


_KERNEL = _gaussian_kernel()


def _filter_valid(x: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian over the last two axes, only where the window lies inside the image.

    scikit-image filters with reflected borders and then crops 5 pixels from every side before
    averaging; the cropped values are exactly the ones whose window never touches a border, so
    computing only those gives the same SSIM without padding.
    """
    n = len(_KERNEL)
    h = x.shape[-2] - n + 1
    rows = _KERNEL[0] * x[..., 0:h, :]
    for i in range(1, n):
        rows += _KERNEL[i] * x[..., i:i + h, :]
    w = x.shape[-1] - n + 1
    out = _KERNEL[0] * rows[..., 0:w]
    for i in range(1, n):
        out += _KERNEL[i] * rows[..., i:i + w]
    return out


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = PIXEL_PEAK) -> np.ndarray:
    """Mean SSIM of each [..., H, W] image pair (Wang et al. 2004), float64.

    Gaussian window (sigma 1.5, 11x11), K1 0.01, K2 0.03, population (not sample) covariance:
    exactly scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)` (tests check 1e-4; the difference is rounding).
    Returns one value per leading index (a scalar array for one 2-D pair).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ux, uy = _filter_valid(x), _filter_valid(y)
    vx = _filter_valid(x * x) - ux * ux
    vy = _filter_valid(y * y) - uy * uy
    vxy = _filter_valid(x * y) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(axis=(-2, -1))


def _compare_pixels(a: np.ndarray, b: np.ndarray, lpips: LpipsFn | None) -> Comparison:
    f = a.shape[0]
    psnrs, ssim_y, ssim_c, flicker = [], [], [], []
    prev: tuple[np.ndarray, np.ndarray] | None = None
    for t in range(f):  # one frame at a time: an 81-frame 720p video in float64 would be 4.5 GB
        diff = a[t].astype(np.int32) - b[t].astype(np.int32)
        psnrs.append(psnr(float(np.mean(diff * diff, dtype=np.float64)), PIXEL_PEAK))
        ya, yb = luma(a[t]), luma(b[t])
        ssim_y.append(float(ssim(ya, yb)))
        ssim_c.append(float(np.mean(ssim(np.moveaxis(a[t], -1, 0), np.moveaxis(b[t], -1, 0)))))
        flicker.append(None if prev is None else float(np.mean(np.abs((yb - prev[1]) - (ya - prev[0])))))
        prev = (ya, yb)
    lp = None if lpips is None else [float(v) for v in lpips(a, b)]
    return Comparison(kind="pixels", shape=tuple(a.shape), psnr=psnrs, psnr_peak=PIXEL_PEAK,
                      identical=bool(np.array_equal(a, b)), ssim_luma=ssim_y, ssim_rgb=ssim_c, flicker=flicker,
                      lpips=lp)


# ----- latents ----------------------------------------------------------------------------------

def _compare_latents(a: np.ndarray, b: np.ndarray) -> Comparison:
    """MSE, PSNR with peak = max |A| over the whole tensor (latents have no fixed range), cosine."""
    a64 = a.astype(np.float64).reshape(a.shape[0], -1)
    b64 = b.astype(np.float64).reshape(b.shape[0], -1)
    peak = float(np.max(np.abs(a64))) if a64.size else 0.0
    mse = np.mean((a64 - b64) ** 2, axis=1)
    cos = []
    for fa, fb in zip(a64, b64):
        na, nb = float(np.linalg.norm(fa)), float(np.linalg.norm(fb))
        if na == 0 or nb == 0:
            cos.append(1.0 if na == nb else 0.0)  # two zero frames agree; a zero and a non-zero do not
        else:
            cos.append(float(np.dot(fa, fb) / (na * nb)))
    return Comparison(kind="latents", shape=tuple(a.shape), psnr=[psnr(float(m), peak) for m in mse], psnr_peak=peak,
                      identical=bool(np.array_equal(a, b)), mse=[float(m) for m in mse], cosine=cos)
