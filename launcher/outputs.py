"""Write one request's files (video, frames, latents) on the output rank; return what was written."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from launcher.video import sha256_of, write_frames, write_latents, write_mp4

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.pipeline import Result
    from launcher.session import Outputs


def write_outputs(cfg: "RunConfig", result: "Result", outputs: "Outputs") -> dict[str, Any]:
    """Every file is written atomically; a failed write (disk full...) leaves no partial file."""
    try:
        return _write(cfg, result, outputs)
    except OSError as e:
        from launcher.errors import RunFailed

        where = e.filename or outputs.video
        raise RunFailed(f"could not write {where}: {e.strerror or e}; free space or choose another output path") from e


def _write(cfg: "RunConfig", result: "Result", outputs: "Outputs") -> dict[str, Any]:
    files: dict[str, Any] = {}
    if outputs.latents is not None:
        write_latents(outputs.latents, result.latents)
        files["latents"] = str(outputs.latents)
    if outputs.frames is not None and result.video is not None:
        paths = write_frames(outputs.frames, result.video)
        files["frames_dir"] = str(outputs.frames)
        files["frames"] = len(paths)
    if outputs.video is not None and result.video is not None:
        write_mp4(outputs.video, result.video, cfg.task.sample_fps)
        files["video"] = str(outputs.video)
        files["video_sha256"] = sha256_of(outputs.video)
        _, f, h, w = result.video.shape
        files["video_frames"], files["video_size"] = f, [w, h]
    return files
