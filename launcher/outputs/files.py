"""Write one request's files (video, frames, latents) on the output rank; return what was written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import RunFailed
from launcher.outputs.atomic import sha256_of
from launcher.outputs.media import write_frames, write_latents, write_mp4

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.wan.pipeline import Result


@dataclass(frozen=True, slots=True)
class Outputs:
    """Where one request's files go (None = not wanted)."""

    video: Path | None
    frames: Path | None = None
    latents: Path | None = None
    calibration: Path | None = None


def write_outputs(config: "RunConfig", result: "Result", outputs: Outputs) -> dict[str, Any]:
    """Every file is written atomically; a failed write (disk full...) leaves no partial file."""
    try:
        return _write(config, result, outputs)
    except OSError as e:
        where = e.filename or outputs.video
        raise RunFailed(f"could not write {where}: {e.strerror or e}; free space or choose another output path") from e


def _write(config: "RunConfig", result: "Result", outputs: Outputs) -> dict[str, Any]:
    files: dict[str, Any] = {}
    if outputs.latents is not None:
        write_latents(outputs.latents, result.latents)
        files["latents"] = str(outputs.latents)
    if outputs.frames is not None and result.video is not None:
        paths = write_frames(outputs.frames, result.video)
        files["frames_dir"] = str(outputs.frames)
        files["frames"] = len(paths)
    if outputs.video is not None and result.video is not None:
        write_mp4(outputs.video, result.video, config.task.sample_fps)
        files["video"] = str(outputs.video)
        files["video_sha256"] = sha256_of(outputs.video)
        _, f, h, w = result.video.shape
        files["video_frames"], files["video_size"] = f, [w, h]
    return files
