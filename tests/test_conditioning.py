"""Latent shapes, noise and image conditioning match the official Wan2.2 pipeline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from launcher.wan.conditioning import (
    best_output_size,
    draw_noise,
    i2v_condition_video,
    i2v_mask,
    i2v_prepare_image,
    i2v_resize,
    i2v_target_size,
    i2v_y,
    latent_shape,
    pil_to_tensor,
    seq_len,
    ti2v_blend,
    ti2v_mask,
    ti2v_prepare_image,
    ti2v_timesteps,
)
from launcher.wan.tasks import TASKS


def _gradient_image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """Deterministic image with distinct R, G, B content, so channel order and layout show."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), (x * y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def _signed(image: Image.Image) -> torch.Tensor:
    """Independent to_tensor * 2 - 1 ([3, H, W], RGB)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


# ------------------------------------------------------------------------- shapes and seq_len


@pytest.mark.parametrize(
    ("task", "frames", "h", "w", "shape"),
    [("t2v-A14B", 81, 720, 1280, (16, 21, 90, 160)), ("t2v-A14B", 81, 480, 832, (16, 21, 60, 104)),
     ("i2v-A14B", 81, 464, 832, (16, 21, 58, 104)), ("ti2v-5B", 121, 704, 1280, (48, 31, 44, 80)),
     ("ti2v-5B", 5, 704, 1248, (48, 2, 44, 78)), ("t2v-A14B", 1, 16, 16, (16, 1, 2, 2))],
)
def test_latent_shape(task, frames, h, w, shape):
    assert latent_shape(task, frames, h, w) == shape
    assert latent_shape(TASKS[task], frames, h, w) == shape


@pytest.mark.parametrize(
    ("args", "msg"),
    [(("t2v-A14B", 80, 720, 1280), "4n\\+1"), (("t2v-A14B", 0, 720, 1280), "4n\\+1"),
     (("t2v-A14B", 81, 721, 1280), "multiples of 16"), (("ti2v-5B", 121, 720, 1280), "multiples of 32"),
     (("t2v-14B", 81, 720, 1280), "unknown task")],
)
def test_latent_shape_rejects_bad_input_in_one_line(args, msg):
    with pytest.raises(ValueError, match=msg) as err:
        latent_shape(*args)
    assert "\n" not in str(err.value)


def test_seq_len_hand_values():
    assert seq_len(21, 90, 160) == 21 * 45 * 80 == 75600
    assert seq_len(21, 60, 104, sp=8) == 32760  # 32760 / 8 = 4095 exactly
    assert seq_len(21, 60, 104, sp=16) == 32768  # 2047.5 -> 2048 * 16
    assert seq_len(31, 44, 80, sp=3) == 27282  # 27280 / 3 = 9093.3 -> 9094 * 3
    with pytest.raises(ValueError, match="patches"):
        seq_len(21, 45, 80)


@given(lat_f=st.integers(1, 40), half_h=st.integers(1, 100), half_w=st.integers(1, 100), sp=st.integers(1, 16))
def test_seq_len_equals_both_official_formulas(lat_f, half_h, half_w, sp):
    lat_h, lat_w = 2 * half_h, 2 * half_w
    t2v = math.ceil((lat_h * lat_w) / (1 * 2 * 2) * lat_f / sp) * sp
    i2v = int(math.ceil(lat_f * lat_h * lat_w // (2 * 2) / sp)) * sp
    assert seq_len(lat_f, lat_h, lat_w, sp=sp) == t2v == i2v


# ------------------------------------------------------------------------------------- noise


def test_noise_is_one_direct_randn_with_a_seeded_generator():
    noise = draw_noise((16, 3, 4, 6), 42, "cpu")
    direct = torch.randn(16, 3, 4, 6, dtype=torch.float32,
                         generator=torch.Generator(device="cpu").manual_seed(42), device="cpu")
    assert noise.dtype == torch.float32 and noise.shape == (16, 3, 4, 6)
    assert torch.equal(noise, direct)
    assert torch.equal(noise, draw_noise([16, 3, 4, 6], 42))
    assert not torch.equal(noise, draw_noise((16, 3, 4, 6), 43))
    with pytest.raises(ValueError, match="seed"):
        draw_noise((1,), -1)


# --------------------------------------------------------------------------------- i2v-A14B


@pytest.mark.parametrize(
    ("img_h", "img_w", "area", "want"),
    [
        # 399360 * (480/832) = 230399.99999999997 -> sqrt 479.999... -> //8 59 -> 58: official 464, not 480
        (480, 832, 399360, (464, 832, 58, 104)),
        (832, 480, 399360, (832, 480, 104, 60)),
        (720, 1280, 921600, (720, 1280, 90, 160)),
        (1280, 720, 921600, (1280, 720, 160, 90)),
        (1024, 1024, 399360, (624, 624, 78, 78)),  # sqrt 631.9 -> 78 -> 78
        (768, 1024, 921600, (816, 1104, 102, 138)),
        (1080, 1920, 399360, (464, 832, 58, 104)),
    ],
)
def test_i2v_target_size(img_h, img_w, area, want):
    got = i2v_target_size(img_h, img_w, area)
    assert got == want and all(type(v) is int for v in got)


def test_i2v_target_size_rejects_degenerate_images():
    with pytest.raises(ValueError, match="fits no"):
        i2v_target_size(1, 100000, 399360)


def test_i2v_prepare_image_is_full_res_tensor_then_plain_bicubic():
    image = _gradient_image(40, 30)
    out = i2v_prepare_image(image, 16, 32)
    assert out.shape == (3, 1, 16, 32) and out.dtype == torch.float32
    want = F.interpolate(_signed(image)[None], size=(16, 32), mode="bicubic", antialias=False)
    assert torch.equal(out[:, 0], want[0])
    # antialias (or a PIL resize) would give something else on this downscale
    aa = F.interpolate(_signed(image)[None], size=(16, 32), mode="bicubic", antialias=True)
    assert (out[:, 0] - aa[0]).abs().max() > 1e-3
    # same size: identity, and channels are R, G, B in CHW
    same = i2v_prepare_image(image, 30, 40)[:, 0]
    assert torch.allclose(same, _signed(image), atol=1e-6)
    assert same[0, 0, -1] == 1.0 and same[0, 0, 0] == -1.0 and same[1, -1, 0] == 1.0


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_images_are_converted_to_rgb_first_like_official(mode):
    image = _gradient_image(64, 40, mode)
    if mode == "RGBA":  # varying alpha: PIL resizes RGBA premultiplied, so order matters
        image.putalpha(_gradient_image(64, 40, "L"))
    rgb = image.convert("RGB")
    assert torch.equal(i2v_prepare_image(image, 32, 48), i2v_prepare_image(rgb, 32, 48))
    assert torch.equal(ti2v_prepare_image(image, 64 * 32), ti2v_prepare_image(rgb, 64 * 32))


def test_pil_to_tensor_is_signed_rgb_chw():
    image = _gradient_image(5, 3)
    pixels = pil_to_tensor(image)
    assert pixels.shape == (3, 3, 5) and pixels.dtype == torch.float32
    assert torch.equal(pixels, _signed(image))  # (x/255 - 0.5)/0.5 == x/255*2 - 1 bit for bit
    assert pixels[0, 0, 0] == -1 and pixels[0, 0, 4] == 1 and pixels[1, 2, 0] == 1


def test_i2v_resize_runs_on_cpu_and_equals_prepare():
    image = _gradient_image(40, 30)
    out = i2v_resize(pil_to_tensor(image), 16, 32)
    assert out.device.type == "cpu" and out.shape == (3, 1, 16, 32)
    assert torch.equal(out, i2v_prepare_image(image, 16, 32))


def test_i2v_condition_video():
    image = torch.rand(3, 1, 8, 16) * 2 - 1
    video = i2v_condition_video(image, 9)
    assert video.shape == (3, 9, 8, 16)
    assert torch.equal(video[:, :1], image)
    assert not video[:, 1:].any()


def _official_i2v_mask(frame_num, lat_h, lat_w):
    msk = torch.ones(1, frame_num, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("frame_num", [1, 5, 81])
def test_i2v_mask(frame_num):
    mask = i2v_mask(frame_num, 6, 8)
    lat_f = (frame_num - 1) // 4 + 1
    assert mask.shape == (4, lat_f, 6, 8) and mask.dtype == torch.float32
    assert (mask[:, 0] == 1).all() and not mask[:, 1:].any()
    assert torch.equal(mask, _official_i2v_mask(frame_num, 6, 8))


def test_i2v_y_is_mask_then_latent():
    mask = i2v_mask(9, 4, 6)
    latent = torch.randn(16, 3, 4, 6)
    y = i2v_y(mask, latent)
    assert y.shape == (20, 3, 4, 6)
    assert torch.equal(y[:4], mask) and torch.equal(y[4:], latent)
    with pytest.raises(ValueError, match="differ"):
        i2v_y(mask, torch.randn(16, 2, 4, 6))


# ---------------------------------------------------------------------------------- ti2v-5B


@pytest.mark.parametrize(
    ("w", "h", "want"),
    [
        (1280, 704, (1280, 704)),
        (704, 1280, (704, 1280)),
        # ratio 1.778: width-first 1248x704 (1.773) beats height-first 1280x704 (1.818)
        (1920, 1080, (1248, 704)),
        (1024, 1024, (960, 928)),  # 928x960 and 960x928 tie: height-first wins
        (800, 600, (1088, 800)),
        (500, 1000, (672, 1312)),
    ],
)
def test_best_output_size(w, h, want):
    assert best_output_size(w, h, 32, 32, 1280 * 704) == want


def test_best_output_size_rejects_degenerate_images():
    with pytest.raises(ValueError, match="fits no"):
        best_output_size(100000, 1, 32, 32, 1280 * 704)


def test_ti2v_prepare_image_lanczos_cover_then_center_crop():
    image = _gradient_image(1920, 1080)
    out = ti2v_prepare_image(image, 1280 * 704)
    assert out.shape == (3, 1, 704, 1248) and out.dtype == torch.float32
    # scale = max(1248/1920, 704/1080) = 0.65185 -> 1252x704, crop x from (1252-1248)//2 = 2
    resized = image.resize((1252, 704), Image.LANCZOS).crop((2, 0, 1250, 704))
    assert torch.equal(out[:, 0], _signed(resized))
    assert out.min() >= -1 and out.max() <= 1


def test_ti2v_mask_and_blend():
    mask = ti2v_mask((48, 3, 4, 6))
    assert mask.shape == (48, 3, 4, 6) and mask.dtype == torch.float32
    assert not mask[:, 0].any() and (mask[:, 1:] == 1).all()
    assert (ti2v_mask((48, 3, 4, 6), image=False) == 1).all()
    z = torch.randn(48, 1, 4, 6)
    noise = torch.randn(48, 3, 4, 6)
    blended = ti2v_blend(z, noise, mask)
    assert torch.equal(blended[:, :1], z) and torch.equal(blended[:, 1:], noise[:, 1:])


@pytest.mark.parametrize("t", [torch.tensor(999), 999])
def test_ti2v_timesteps_zero_for_image_tokens(t):
    mask = ti2v_mask((48, 3, 4, 6))
    ts = ti2v_timesteps(mask, t, 20)  # 3 frames x 2 x 3 tokens = 18, padded to 20
    assert ts.shape == (1, 20) and ts.dtype == torch.float32
    assert not ts[0, :6].any()
    assert (ts[0, 6:] == 999).all()
    all_t = ti2v_timesteps(ti2v_mask((48, 3, 4, 6), image=False), t, 18)
    assert (all_t == 999).all()
    with pytest.raises(ValueError, match="shorter"):
        ti2v_timesteps(mask, t, 17)
