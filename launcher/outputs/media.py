"""Video, frame and latent files, each written atomically (see `launcher.outputs.atomic`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.outputs.atomic import atomic_path


def frames_uint8_truncated(video: torch.Tensor) -> np.ndarray:
    """[3,F,H,W] in [-1,1] -> [F,H,W,3] uint8 the way the official `save_video` does (truncation).

    The mp4 follows official so a video compares frame for frame with one made by generate.py.
    """
    x = video.detach().float().clamp(-1, 1)
    x = (x + 1) / 2
    return (x * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


def frames_uint8_rounded(video: torch.Tensor) -> np.ndarray:
    """[3,F,H,W] in [-1,1] -> [F,H,W,3] uint8, rounded: the lossless `--save-frames` form."""
    x = video.detach().float().clamp(-1, 1)
    return ((x + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(path: Path, video: torch.Tensor, fps: int) -> None:
    """H.264 mp4 through imageio-ffmpeg's bundled ffmpeg binary (no system ffmpeg needed).

    We run the binary ourselves instead of `imageio_ffmpeg.write_frames` because that generator
    ignores ffmpeg's exit status: a full disk would leave a truncated mp4 that we then renamed
    into place. Same encoder settings as the official `save_video` (libx264, quality 8 = crf 10).
    """
    import subprocess

    import imageio_ffmpeg

    frames = frames_uint8_truncated(video)
    f, h, w, _ = frames.shape
    with atomic_path(Path(path), suffix=".mp4") as tmp:
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
            "-s", f"{w}x{h}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-",
            "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-movflags", "+faststart", "-f", "mp4", str(tmp),
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(frames.tobytes())
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            raise OSError(0, f"ffmpeg: {reason}", str(path))


def read_mp4_info(path: Path) -> dict[str, Any]:
    """Frame count, fps and size as ffmpeg reads them back (for tests and `batch` verification)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    n = sum(1 for _ in reader)
    return {"frames": n, "fps": meta["fps"], "size": tuple(meta["size"])}


def write_frames(directory: Path, video: torch.Tensor) -> list[Path]:
    """One lossless PNG per frame, `frame_00000.png`...; each written atomically."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames_uint8_rounded(video)):
        final = directory / f"frame_{i:05d}.png"
        with atomic_path(final, suffix=".png") as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        paths.append(final)
    return paths


def write_latents(path: Path, latents: torch.Tensor) -> None:
    """Final latents before decode: key `latents`, float32, [C,F,H,W]."""
    from safetensors.torch import save

    with atomic_path(Path(path), suffix=".safetensors") as tmp:
        # bytes written into our temp file: safetensors' save_file replaces it with a mode-0600 file of its own
        tmp.write_bytes(save({"latents": latents.detach().float().contiguous().cpu()}))
