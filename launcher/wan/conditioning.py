"""Latent shapes, noise and image conditioning exactly as the official Wan2.2 pipeline.

Pure tensor/PIL functions, float32, no models (docs/pipeline_facts.md #12, #16, #17, #18). The float
arithmetic copies the official expressions on purpose: e.g. a 832x480 (w x h) image at
area 832*480 becomes 832x464 in official i2v-A14B, because `399360 * (480/832)` is
230399.99999999997 and its square root floors one step lower.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from launcher.wan.tasks import TASKS, TaskSpec

#: the official DiT patch (frames, height, width); i2v/ti2v code hard-codes the 2x2 token stride
PATCH_SIZE: tuple[int, int, int] = (1, 2, 2)


def _spec(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return TASKS[task]


def latent_frames(frame_num: int, temporal_stride: int = 4) -> int:
    """Latent frames for `frame_num` video frames; the VAE needs frame_num = 4n+1."""
    if frame_num < 1 or (frame_num - 1) % temporal_stride:
        raise ValueError(f"frame_num must be 4n+1 (e.g. 81 or 121), got {frame_num}")
    return (frame_num - 1) // temporal_stride + 1


def latent_shape(task: str | TaskSpec, frame_num: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F, H, W) of the noise latent for a video of `height` x `width` pixels.

    C is the VAE z_dim (16 for both A14B tasks, i2v too; 48 for ti2v-5B). Sizes must be
    multiples of VAE stride x patch so every latent maps to whole tokens.
    """
    spec = _spec(task)
    st, sh, sw = spec.vae_stride
    step = spec.spatial_stride
    if height < step or width < step or height % step or width % step:
        raise ValueError(
            f"{spec.name} needs width and height that are positive multiples of {step}, "
            f"got {width}x{height}; pick one of --size {', '.join(spec.supported_sizes)}"
        )
    return (spec.z_dim, latent_frames(frame_num, st), height // sh, width // sw)


def seq_len(lat_f: int, lat_h: int, lat_w: int, patch: Sequence[int] = PATCH_SIZE, sp: int = 1) -> int:
    """DiT tokens for a latent, rounded up to a multiple of the sequence-parallel size.

    Official t2v writes `ceil(lat_h*lat_w/4 * lat_f / sp) * sp` in floats and i2v/ti2v
    `ceil(lat_f*lat_h*lat_w//4 / sp) * sp`; for latents that patchify evenly (checked
    here) both equal this integer form.
    """
    pt, ph, pw = patch
    if lat_f % pt or lat_h % ph or lat_w % pw:
        raise ValueError(f"latent {lat_f}x{lat_h}x{lat_w} does not split into {pt}x{ph}x{pw} patches")
    if sp < 1:
        raise ValueError(f"sequence-parallel size must be >= 1, got {sp}")
    tokens = (lat_f // pt) * (lat_h // ph) * (lat_w // pw)
    return -(-tokens // sp) * sp


def draw_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The official single draw: a generator on the compute device, one float32 randn.

    The generator lives on `device` like official (`torch.Generator(device=self.device)`),
    so CUDA runs match official CUDA runs; CPU and CUDA streams differ.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}; pass a non-negative --base_seed")
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float32, generator=generator, device=device)


def _rgb(image: Image.Image) -> Image.Image:
    # official generate.py opens every image with .convert("RGB") before any resize
    return image if image.mode == "RGB" else image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], RGB: official `TF.to_tensor(img).sub_(0.5).div_(0.5)`.

    Written out (bytes -> float32, /255, CHW) because torchvision is unusable beside this torch.
    """
    array = np.asarray(_rgb(image), dtype=np.uint8).copy()
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return pixels.sub(0.5).div(0.5)


# ------------------------------------------------------------------------- i2v-A14B (fact 17)


def i2v_target_size(img_h: int, img_w: int, max_area: int, vae_stride: int = 8,
                    patch: int = 2) -> tuple[int, int, int, int]:
    """(h, w, lat_h, lat_w): the official i2v-A14B output size for an `img_h` x `img_w` image.

    Keeps the image's aspect under `max_area` pixels with numpy float64 floor-divisions,
    as official (the image is later stretched, not cropped, to this size).
    """
    aspect_ratio = img_h / img_w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(
            f"image {img_w}x{img_h} fits no {vae_stride * patch}-aligned size within {max_area} pixels; "
            "use a larger --size or crop the image closer to the video's aspect"
        )
    return lat_h * vae_stride, lat_w * vae_stride, lat_h, lat_w


def i2v_resize(pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[3, 1, h, w]: the full-resolution [-1, 1] image (`pil_to_tensor`) bicubic-resized.

    No antialias and no crop (aspect may change), and on CPU like official
    (`img[None].cpu()`), since bicubic on another device rounds differently.
    """
    return F.interpolate(pixels[None].cpu(), size=(h, w), mode="bicubic").transpose(0, 1)


def i2v_prepare_image(image: Image.Image, h: int, w: int) -> torch.Tensor:
    """[3, 1, h, w] float32 on CPU: `i2v_resize(pil_to_tensor(image), h, w)`."""
    return i2v_resize(pil_to_tensor(image), h, w)


def i2v_condition_video(image: torch.Tensor, frame_num: int) -> torch.Tensor:
    """[3, frame_num, h, w]: the image frame followed by frame_num-1 black (zero) frames."""
    c, _, h, w = image.shape
    zeros = torch.zeros(c, frame_num - 1, h, w, dtype=image.dtype, device=image.device)
    return torch.cat([image, zeros], dim=1)


def i2v_mask(frame_num: int, lat_h: int, lat_w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[4, lat_f, lat_h, lat_w]: 1 where the image frame is known, else 0.

    Official builds a per-frame mask (frame 0 kept, repeated 4x so frames group into
    latents of 4) and views it as [lat_f, 4] -> [4, lat_f]; the result is ones in latent
    frame 0 and zeros elsewhere, built here directly.
    """
    mask = torch.zeros(4, latent_frames(frame_num), lat_h, lat_w, dtype=torch.float32, device=device)
    mask[:, 0] = 1.0
    return mask


def i2v_y(mask: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """[4 + 16, lat_f, lat_h, lat_w]: the DiT's extra input channels (cond and uncond alike)."""
    if mask.shape[1:] != encoded.shape[1:]:
        raise ValueError(f"mask {tuple(mask.shape)} and encoded image {tuple(encoded.shape)} differ in F/H/W")
    return torch.cat([mask, encoded.to(mask.dtype)])


# -------------------------------------------------------------------------- ti2v-5B (fact 18)


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """(ow, oh) under `expected_area`, multiples of (dw, dh), aspect closest to w/h.

    Official `best_output_size`: tries width-first and height-first rounding and keeps
    the one whose aspect ratio is closer (ties go to height-first); Python floats.
    """
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh2 = int(oh // dh * dh)
    if ow1 <= 0 or oh2 <= 0:
        raise _no_room(w, h, dw, dh, expected_area)
    oh1 = int(expected_area / ow1 // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    if oh1 <= 0 or ow2 <= 0:
        raise _no_room(w, h, dw, dh, expected_area)
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def _no_room(w: int, h: int, dw: int, dh: int, area: int) -> ValueError:
    return ValueError(
        f"image {w}x{h} fits no {dw}x{dh}-aligned size within {area} pixels; "
        "use a larger --size or crop the image closer to the video's aspect"
    )


def ti2v_prepare_image(image: Image.Image, max_area: int, stride: int = 32) -> torch.Tensor:
    """[3, 1, oh, ow] in [-1, 1]: LANCZOS-scale to cover (ow, oh), then center-crop."""
    image = _rgb(image)
    iw, ih = image.width, image.height
    ow, oh = best_output_size(iw, ih, stride, stride, max_area)
    scale = max(ow / iw, oh / ih)
    image = image.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1 = (image.width - ow) // 2
    y1 = (image.height - oh) // 2
    image = image.crop((x1, y1, x1 + ow, y1 + oh))
    return pil_to_tensor(image).unsqueeze(1)


def ti2v_mask(shape: Sequence[int], image: bool = True,
              device: torch.device | str | None = None) -> torch.Tensor:
    """`mask2` of official `masks_like([noise], zero=image)[1][0]`: ones, latent frame 0 zeroed
    when an image conditions the video (t2v: all ones). Shape [C, F, H, W], float32."""
    mask = torch.ones(*shape, dtype=torch.float32, device=device)
    if image:
        mask[:, 0] = 0.0
    return mask


def ti2v_blend(z: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latent frame 0 from the image latent `z` ([C, 1, H, W] broadcasts), the rest from
    `noise`; official applies it before the loop and after every scheduler step."""
    return (1.0 - mask) * z + mask * noise


def ti2v_timesteps(mask: torch.Tensor, t: torch.Tensor | int, seq_len: int) -> torch.Tensor:
    """[1, seq_len] float32 per-token timesteps: 0 for image tokens, t elsewhere and for padding."""
    t = torch.as_tensor(t, device=mask.device).reshape(1)
    tokens = (mask[0][:, ::2, ::2] * t).flatten()
    if tokens.numel() > seq_len:
        raise ValueError(f"seq_len {seq_len} is shorter than the latent's {tokens.numel()} tokens")
    padding = tokens.new_ones(seq_len - tokens.numel()) * t
    return torch.cat([tokens, padding]).unsqueeze(0)

