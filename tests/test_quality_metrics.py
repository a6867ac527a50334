"""`launcher.quality`: metrics checked against closed forms, hand-computed values and scikit-image.

scikit-image is a test-only dependency: it is the reference the SSIM must match, not something
`compare` runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from launcher.errors import UsageError
from launcher.quality.frames import Frames, load_frames
from launcher.quality.metrics import compare_frames, luma, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")


def pixels(data: np.ndarray) -> Frames:
    return Frames("pixels", np.ascontiguousarray(data, dtype=np.uint8))


def smooth_video(f: int, h: int, w: int, seed: int = 0, lo: int = 20, hi: int = 235) -> np.ndarray:
    """Structured content (gradients + a moving blob + mild noise) inside [lo, hi], so +/- offsets never clip."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((f, h, w, 3))
    for t in range(f):
        blob = np.exp(-(((x - w * (0.3 + 0.1 * t)) ** 2 + (y - h / 2) ** 2) / (0.1 * h * w)))
        for c in range(3):
            out[t, ..., c] = 0.5 * (x / w + (c + 1) * y / (3 * h)) + blob + 0.05 * rng.standard_normal((h, w))
    out = (out - out.min()) / (out.max() - out.min())
    return np.round(lo + out * (hi - lo)).astype(np.uint8)


def skimage_ssim(a: np.ndarray, b: np.ndarray, **kw) -> float:
    return float(skimage_metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, data_range=255, **kw))


# ----- identical and closed-form PSNR -----------------------------------------------------------

def test_identical_videos():
    a = pixels(smooth_video(4, 24, 40))
    c = compare_frames(a, pixels(a.data.copy()))
    assert c.identical and c.kind == "pixels" and c.shape == (4, 24, 40, 3)
    assert all(math.isinf(p) and p > 0 for p in c.psnr) and math.isinf(c.mean_psnr)
    assert c.ssim_luma == [1.0] * 4 and c.ssim_rgb == [1.0] * 4
    assert c.flicker == [None, 0.0, 0.0, 0.0] and c.mean_flicker == 0.0
    assert c.headline == ("ssim_luma", 1.0)
    j = json.loads(json.dumps(c.to_json(), allow_nan=False))  # strict JSON: no Infinity anywhere
    assert j["identical"] is True
    assert j["mean"]["psnr"] is None and j["per_frame"]["psnr"] == [None] * 4
    assert j["headline"] == {"metric": "ssim_luma", "value": 1.0}
    assert j["mean"]["ssim_luma"] == 1.0 and j["mean"]["lpips"] is None and j["per_frame"]["lpips"] is None
    assert j["per_frame"]["flicker"] == [None, 0.0, 0.0, 0.0]
    assert set(j) == {"kind", "shape", "frames", "identical", "headline", "psnr_peak", "mean", "per_frame"}


@pytest.mark.parametrize("d", [1, 3, 8, 17])
def test_psnr_closed_form(d):
    """+/-d on a checkerboard (every pixel and channel off by exactly d): MSE = d^2, PSNR = 20 log10(255/d)."""
    a = smooth_video(3, 20, 30, lo=20, hi=235)
    h, w = a.shape[1:3]
    sign = np.where((np.add.outer(np.arange(h), np.arange(w)) % 2) == 0, 1, -1)[None, :, :, None]
    b = (a.astype(np.int32) + d * sign).astype(np.uint8)
    assert np.all(np.abs(b.astype(int) - a.astype(int)) == d)  # no clipping
    c = compare_frames(pixels(a), pixels(b))
    expected = 20 * math.log10(255 / d)
    assert not c.identical
    for p in c.psnr:
        assert abs(p - expected) < 0.01
    assert abs(c.mean_psnr - expected) < 0.01
    assert json.loads(json.dumps(c.to_json()))["mean"]["psnr"] == pytest.approx(expected, abs=0.01)


def test_one_identical_frame_makes_the_mean_psnr_inf_but_not_identical():
    a = smooth_video(3, 16, 16)
    b = a.copy()
    b[1] = a[1] + 2
    c = compare_frames(pixels(a), pixels(b))
    assert math.isinf(c.psnr[0]) and math.isfinite(c.psnr[1]) and math.isinf(c.mean_psnr)
    assert not c.identical
    j = c.to_json()
    assert j["identical"] is False and j["mean"]["psnr"] is None and j["per_frame"]["psnr"][1] is not None


# ----- SSIM against scikit-image ----------------------------------------------------------------

def _pair(kind: str, h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = smooth_video(1, h, w, seed=seed)[0]
    if kind == "noise":
        b = np.clip(a.astype(int) + rng.integers(-25, 26, a.shape), 0, 255)
    elif kind == "offset":
        b = np.clip(a.astype(int) + 12, 0, 255)
    elif kind == "blur":
        b = a.astype(float)
        b[1:-1] = (b[:-2] + b[1:-1] + b[2:]) / 3
    else:  # unrelated random image
        b = rng.integers(0, 256, a.shape)
    return a, np.asarray(b).round().astype(np.uint8)


SSIM_CASES = [("noise", 16, 16), ("blur", 16, 16), ("noise", 37, 53), ("offset", 53, 37), ("blur", 48, 64),
              ("random", 11, 29), ("noise", 64, 33)]


@pytest.mark.parametrize("kind,h,w", SSIM_CASES, ids=[f"{k}-{h}x{w}" for k, h, w in SSIM_CASES])
def test_ssim_matches_scikit_image(kind, h, w):
    a, b = _pair(kind, h, w, seed=h * 100 + w)
    ya, yb = luma(a), luma(b)
    assert abs(float(ssim(ya, yb)) - skimage_ssim(ya, yb)) < 1e-4
    rgb = float(np.mean(ssim(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0))))
    assert abs(rgb - skimage_ssim(a, b, channel_axis=-1)) < 1e-4
    # and frame by frame through compare_frames (the headline is the luma one)
    c = compare_frames(pixels(np.stack([a, b])), pixels(np.stack([b, a])))
    assert c.ssim_luma == pytest.approx([skimage_ssim(ya, yb), skimage_ssim(yb, ya)], abs=1e-4)
    assert c.ssim_rgb == pytest.approx([skimage_ssim(a, b, channel_axis=-1)] * 2, abs=1e-4)
    assert c.headline[0] == "ssim_luma" and c.to_json()["headline"]["metric"] == "ssim_luma"


def test_luma_is_bt601():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    assert luma(px)[0] == pytest.approx([76.245, 149.685, 29.07, 0.299 * 10 + 0.587 * 20 + 0.114 * 30])


# ----- temporal flicker -------------------------------------------------------------------------

def test_flicker_constant_offset_is_zero_and_one_frame_offset_is_hand_computed():
    a = smooth_video(5, 16, 24)
    # the same offset in every frame: B changes from frame to frame exactly as A does
    c = compare_frames(pixels(a), pixels(a + 6))
    assert c.mean_flicker == pytest.approx(0.0, abs=1e-12) and math.isfinite(c.mean_psnr)
    # +6 grey on frame 2 only: |dB - dA| = 6 at t=2 (step into it) and t=3 (step out), 0 at t=1, 4
    b = a.copy()
    b[2] = a[2] + 6
    c = compare_frames(pixels(a), pixels(b))
    assert c.flicker[0] is None
    assert c.flicker[1:] == pytest.approx([0.0, 6.0, 6.0, 0.0], abs=1e-9)
    assert c.mean_flicker == pytest.approx(12.0 / 4, abs=1e-9)
    # +10 on red only, frame 2: luma moves by 0.299 * 10
    b = a.copy()
    b[2, ..., 0] = a[2, ..., 0] + 10
    c = compare_frames(pixels(a), pixels(b))
    assert c.flicker[1:] == pytest.approx([0.0, 2.99, 2.99, 0.0], abs=1e-9)
    assert c.to_json()["mean"]["flicker"] == pytest.approx(2 * 2.99 / 4, abs=1e-9)


def test_one_frame_video_has_no_flicker():
    a = smooth_video(1, 16, 16)
    c = compare_frames(pixels(a), pixels(a + 1))
    assert c.flicker == [None] and c.mean_flicker is None and c.to_json()["mean"]["flicker"] is None


# ----- latents ----------------------------------------------------------------------------------

def latents(data: np.ndarray) -> Frames:
    return Frames("latents", np.asarray(data, dtype=np.float32))


def test_latent_metrics():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)  # [F,C,H,W]
    a[1, 0, 0, 0] = -4.0  # the peak: max |A| over the whole tensor
    b = a.copy()
    b[0] = a[0] + 0.5  # MSE 0.25
    b[1] = -a[1]  # cosine -1
    b[2] = 2 * a[2]  # cosine 1, MSE = mean(a^2)
    c = compare_frames(latents(a), latents(b))
    peak = float(np.max(np.abs(a)))
    assert peak == 4.0 and c.psnr_peak == 4.0
    mse2 = float(np.mean(a[2].astype(np.float64) ** 2))
    mse1 = float(np.mean((2 * a[1].astype(np.float64)) ** 2))
    assert c.mse == pytest.approx([0.25, mse1, mse2], rel=1e-6)
    assert c.psnr == pytest.approx([10 * math.log10(16 / m) for m in (0.25, mse1, mse2)], abs=1e-4)
    assert c.cosine[1] == pytest.approx(-1.0, abs=1e-9) and c.cosine[2] == pytest.approx(1.0, abs=1e-9)
    assert c.ssim_luma is None and c.flicker is None and c.headline == ("psnr", c.mean_psnr)
    j = c.to_json()
    assert j["kind"] == "latents" and j["shape"] == [3, 4, 5, 6] and j["psnr_peak"] == 4.0
    assert set(j["mean"]) == {"psnr", "mse", "cosine"} and set(j["per_frame"]) == {"psnr", "mse", "cosine"}
    same = compare_frames(latents(a), latents(a.copy()))
    assert same.identical and same.cosine == pytest.approx([1.0] * 3) and same.mse == [0.0] * 3
    assert same.to_json()["per_frame"]["psnr"] == [None] * 3 and same.to_json()["identical"] is True


# ----- one-line errors --------------------------------------------------------------------------

def _shape_only(shape: tuple[int, ...], kind: str = "pixels") -> Frames:
    """A Frames of any size without the memory: a zero-stride view (only its shape is read)."""
    dtype = np.uint8 if kind == "pixels" else np.float32
    return Frames(kind, np.broadcast_to(np.zeros(1, dtype), shape))  # type: ignore[arg-type]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_shape_and_kind_errors_name_both_sides():
    with pytest.raises(UsageError) as e:
        compare_frames(_shape_only((81, 720, 1280, 3)), _shape_only((49, 480, 832, 3)))
    assert _one_line(e) == "A has 81 frames of 1280x720, B has 49 frames of 832x480; compare videos of one shape"
    with pytest.raises(UsageError) as e:
        compare_frames(_shape_only((21, 16, 60, 104), "latents"), _shape_only((13, 16, 60, 104), "latents"))
    assert "A has 21 latent frames of 16x60x104" in _one_line(e) and "B has 13 latent frames" in str(e.value)
    with pytest.raises(UsageError) as e:
        compare_frames(_shape_only((5, 64, 64, 3)), _shape_only((5, 16, 8, 8), "latents"))
    assert "A is a video (pixels), B is latents" in _one_line(e)
    with pytest.raises(UsageError) as e:
        compare_frames(_shape_only((2, 8, 16, 3)), _shape_only((2, 8, 16, 3)))
    assert "16x8" in _one_line(e) and "11x11" in str(e.value)
    with pytest.raises(UsageError) as e:
        compare_frames(_shape_only((2, 4, 5, 6), "latents"), _shape_only((2, 4, 5, 6), "latents"), lpips=lambda a, b: [])
    assert "LPIPS compares pixels" in _one_line(e)


# ----- loading ----------------------------------------------------------------------------------

def test_load_png_folder_and_latents(tmp_path):
    from PIL import Image
    from safetensors.numpy import save_file

    video = smooth_video(3, 16, 24)
    for i in (2, 0, 1):  # written out of order: read back in name order
        Image.fromarray(video[i]).save(tmp_path / f"frame_{i:05d}.png")
    f = load_frames(tmp_path)
    assert f.kind == "pixels" and f.data.dtype == np.uint8 and np.array_equal(f.data, video)
    assert f.describe() == "3 frames of 24x16"
    lat = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # [C,F,H,W]
    save_file({"latents": lat}, str(tmp_path / "l.safetensors"))
    g = load_frames(tmp_path / "l.safetensors")
    assert g.kind == "latents" and g.data.shape == (3, 2, 4, 5) and np.array_equal(g.data[1, 0], lat[0, 1])


def test_load_errors_are_one_line_naming_the_file(tmp_path):
    from PIL import Image
    from safetensors.numpy import save_file

    cases = []
    cases.append((tmp_path / "missing.mp4", "not found"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    cases.append((junk, "not a video ffmpeg can read"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "no PNG frames"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mixed / "frame_00000.png")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(mixed / "frame_00001.png")
    cases.append((mixed, "one size"))
    wrong_key = tmp_path / "wrong.safetensors"
    save_file({"x": np.zeros((2, 2), np.float32)}, str(wrong_key))
    cases.append((wrong_key, "no tensor named 'latents'"))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 5)
    cases.append((bad_st, "not a readable safetensors file"))
    for path, needle in cases:
        with pytest.raises(UsageError) as e:
            load_frames(path)
        msg = _one_line(e)
        assert needle in msg and path.name in msg, msg


# ----- LPIPS, with random weights in the real files' key layout ---------------------------------

ALEX_FEATURES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
LIN_CHANNELS = (64, 192, 384, 256, 256)


def write_random_lpips_weights(directory: Path, seed: int = 0) -> Path:
    """torchvision's alexnet-owt-7be5be79.pth keys (classifier too) and lpips' alex.pth keys, random values.

    The lin weights are non-negative, as the trained ones are (a distance must not go below 0).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    alex = {}
    for i, shape in ALEX_FEATURES.items():
        alex[f"features.{i}.weight"] = torch.randn(shape, generator=g) * (2.0 / math.prod(shape[1:])) ** 0.5
        alex[f"features.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    alex["classifier.1.weight"] = torch.zeros(8, 8)  # present in the real file, unused by LPIPS
    lin = {f"lin{n}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for n, c in enumerate(LIN_CHANNELS)}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(alex, directory / "alexnet-owt-7be5be79.pth")
    torch.save(lin, directory / "alex.pth")
    return directory


def reference_lpips(weights: Path, x0: np.ndarray, x1: np.ndarray) -> float:
    """LPIPS written out from the paper with torch.nn.functional, independent of LpipsAlex's modules."""
    import torch
    import torch.nn.functional as F

    alex = torch.load(weights / "alexnet-owt-7be5be79.pth", weights_only=True)
    lin = torch.load(weights / "alex.pth", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        x = (x - shift) / scale
        conv = lambda x, i, s=1, p=1: F.relu(F.conv2d(x, alex[f"features.{i}.weight"], alex[f"features.{i}.bias"], s, p))
        r1 = conv(x, 0, 4, 2)
        r2 = conv(F.max_pool2d(r1, 3, 2), 3, 1, 2)
        r3 = conv(F.max_pool2d(r2, 3, 2), 6)
        r4 = conv(r3, 8)
        return [r1, r2, r3, r4, conv(r4, 10)]

    total = 0.0
    for n, (f0, f1) in enumerate(zip(feats(x0), feats(x1))):
        n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += float(((n0 - n1) ** 2 * lin[f"lin{n}.model.1.weight"]).sum(1).mean())
    return total


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory) -> Path:
    return write_random_lpips_weights(tmp_path_factory.mktemp("lpips"))


def test_lpips_distance(lpips_weights):
    from launcher.quality.lpips import load_lpips

    model = load_lpips(lpips_weights)
    a = smooth_video(2, 40, 48, seed=1)
    b = smooth_video(2, 40, 48, seed=2)
    b[1] = np.clip(b[1].astype(int) + 40, 0, 255)
    assert model.distance(a, a) == [0.0, 0.0]
    ab, ba = model.distance(a, b), model.distance(b, a)
    assert ab == pytest.approx(ba, abs=1e-7) and all(d > 0 for d in ab)
    assert ab[0] == pytest.approx(reference_lpips(lpips_weights, a[0], b[0]), rel=1e-4)
    assert ab[1] == pytest.approx(reference_lpips(lpips_weights, a[1], b[1]), rel=1e-4)
    assert model.distance(a[0], b[0]) == pytest.approx(ab[:1])  # one [H,W,3] frame works too
    c = compare_frames(pixels(a), pixels(b), lpips=model)
    assert c.lpips == pytest.approx(ab) and c.to_json()["mean"]["lpips"] == pytest.approx(np.mean(ab))
    for x, y, needle in ((a, b[:1], "one shape"), (a[..., :2], b[..., :2], "RGB"), (a[:, :20], b[:, :20], "31x31")):
        with pytest.raises(UsageError) as e:
            model.distance(x, y)
        assert needle in _one_line(e)


def test_lpips_weight_errors_are_one_line(tmp_path, lpips_weights):
    import shutil

    import torch

    from launcher.quality.lpips import load_lpips

    with pytest.raises(UsageError) as e:
        load_lpips(tmp_path / "none")
    assert "not a folder" in _one_line(e)
    only_alex = tmp_path / "only_alex"
    only_alex.mkdir()
    shutil.copy(lpips_weights / "alexnet-owt-7be5be79.pth", only_alex)
    with pytest.raises(UsageError) as e:
        load_lpips(only_alex)
    assert "alex.pth not found" in _one_line(e) and "lpips" in str(e.value)
    wrong = tmp_path / "wrong"
    shutil.copytree(lpips_weights, wrong)
    lin = torch.load(wrong / "alex.pth", weights_only=True)
    lin["lin2.model.1.weight"] = torch.zeros(1, 100, 1, 1)
    torch.save(lin, wrong / "alex.pth")
    with pytest.raises(UsageError) as e:
        load_lpips(wrong)
    assert "lin2.model.1.weight has shape [1, 100, 1, 1], expected [1, 384, 1, 1]" in _one_line(e)
    (wrong / "alex.pth").write_bytes(b"garbage")
    with pytest.raises(UsageError) as e:
        load_lpips(wrong)
    assert "not a torch weights file" in _one_line(e)


def test_plot_latents_with_identical_frames(tmp_path):
    from PIL import Image

    from launcher.quality.plot import plot_per_frame

    a = np.random.default_rng(0).standard_normal((3, 4, 5, 6)).astype(np.float32)
    b = a.copy()
    b[1] += 0.1
    out = plot_per_frame(compare_frames(latents(a), latents(b)), tmp_path / "sub" / "p.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["p.png"]  # no temp file left
