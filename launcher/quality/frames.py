"""Read what `generate` writes (the mp4, `--save-frames` PNGs, `--save-latents`) into numpy arrays.

Every failure is a UsageError naming the file: a user comparing two outputs should learn which
one is wrong, never see a decoder traceback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from launcher.errors import UsageError

FrameKind = Literal["pixels", "latents"]


@dataclass(frozen=True, eq=False)
class Frames:
    """One video, frames first.

    kind "pixels": uint8 [F,H,W,3] RGB (mp4 or PNG folder). kind "latents": float32 [F,C,H,W],
    the `--save-latents` tensor [C,F,H,W] with its frame axis moved to the front so that both
    kinds are indexed per frame the same way.
    """

    kind: FrameKind
    data: np.ndarray
    source: str = ""

    @property
    def frames(self) -> int:
        return int(self.data.shape[0])

    def describe(self) -> str:
        """`81 frames of 1280x720` (pixels, WIDTHxHEIGHT as --size) or `21 latent frames of 16x60x104 (CxHxW)`."""
        if self.kind == "pixels":
            f, h, w, _ = self.data.shape
            return f"{f} frames of {w}x{h}"
        f, c, h, w = self.data.shape
        return f"{f} latent frames of {c}x{h}x{w} (CxHxW)"


def load_frames(path: str | Path) -> Frames:
    """An .mp4 (or any video ffmpeg decodes), a folder of PNG frames, or a .safetensors latents file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    if path.is_dir():
        return _load_png_folder(path)
    if path.suffix.lower() == ".safetensors":
        return _load_latents(path)
    return _load_video(path)


def _load_video(path: Path) -> Frames:
    """Decode to RGB24 with imageio-ffmpeg's bundled ffmpeg, the binary `write_mp4` encodes with."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        w, h = (int(v) for v in meta["size"])
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
        raise UsageError(f"{path}: not a video ffmpeg can read ({_last_line(e)}); "
                         "give an .mp4, a folder of PNG frames or a .safetensors latents file") from None
    if not frames:
        raise UsageError(f"{path}: the video has no frames")
    return Frames("pixels", np.stack(frames), str(path))


def _load_png_folder(path: Path) -> Frames:
    """`frame_*.png` as `--save-frames` names them, else every `*.png`, in sorted name order."""
    from PIL import Image

    files = sorted(path.glob("frame_*.png")) or sorted(path.glob("*.png"))
    if not files:
        raise UsageError(f"{path}: no PNG frames in this folder (--save-frames writes frame_00000.png, ...)")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as e:  # PIL raises many types for broken files
            raise UsageError(f"{f}: not a readable PNG ({type(e).__name__})") from None
        if frames[-1].shape != frames[0].shape:
            h0, w0, _ = frames[0].shape
            h, w, _ = frames[-1].shape
            raise UsageError(f"{f}: {w}x{h}, but {files[0].name} is {w0}x{h0}; every frame of a folder must be one size")
    return Frames("pixels", np.stack(frames), str(path))


def _load_latents(path: Path) -> Frames:
    """Key `latents`, [C,F,H,W] as `--save-latents` writes it; returned as float32 [F,C,H,W]."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a readable safetensors file ({_last_line(e)})") from None
    if "latents" not in tensors:
        raise UsageError(f"{path}: no tensor named 'latents' (found {sorted(tensors)[:5]}); "
                         "give a file written by --save-latents")
    lat = tensors["latents"]
    if lat.ndim != 4:
        raise UsageError(f"{path}: 'latents' has shape {list(lat.shape)}; expected [C,F,H,W] as --save-latents writes")
    return Frames("latents", np.ascontiguousarray(lat.astype(np.float32).transpose(1, 0, 2, 3)), str(path))


def _last_line(e: BaseException) -> str:
    """The informative line of a multi-line error (ffmpeg puts the reason last)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
