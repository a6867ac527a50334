"""What one request, one client and one address may ask of the server: limits checked before any
work, each refusal one line naming the limit (HTTP 400/413/408/429, or exit 2 at start).

A body is read in chunks against its cap and a deadline (a 200 MiB body costs at most the cap, a
client that sends a byte a second is cut off); the frames, steps and pixels of a request are
checked on its RunConfig (what the ranks would run); an uploaded image's size is read from its
header before any pixel is decoded (a decompression bomb is a small file with a huge header).
"""
from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass
from typing import Any


class LimitExceeded(Exception):
    """A request over one of the server's limits; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)  # no slots: the CLI reads the defaults off the class
class Limits:
    max_body_mb: int = 32
    #: seconds a client may take to send its whole body
    body_timeout_s: float = 30.0
    max_frames: int = 241
    max_steps: int = 200
    #: width x height of the video
    max_pixels: int = 1280 * 720
    #: width x height of an uploaded first frame, read from its header
    max_image_pixels: int = 4096 * 4096
    #: queued + running jobs one client (token, or address without tokens) may hold
    max_per_client: int | None = None

    @property
    def max_body(self) -> int:
        return self.max_body_mb << 20

    def check_config(self, config: Any) -> None:
        """The request's RunConfig against --max-frames/--max-steps/--max-pixels (LimitExceeded 400)."""
        pixels = config.max_area
        for value, limit, what, flag in ((config.frame_num, self.max_frames, "frame_num", "--max-frames"),
                                          (config.sample_steps, self.max_steps, "sample_steps", "--max-steps"),
                                          (pixels, self.max_pixels, f"size {config.width}*{config.height}",
                                           "--max-pixels")):
            if value > limit:
                shown = f"{what} ({value} pixels)" if flag == "--max-pixels" else f"{what} {value}"
                raise LimitExceeded(400, f"{shown}: over this server's {flag} {limit}")

    def check_image_size(self, width: int, height: int) -> None:
        if width * height > self.max_image_pixels:
            raise LimitExceeded(400, f"field 'image': {width}x{height} is over this server's --max-image-pixels "
                                     f"{self.max_image_pixels}; send a smaller image")


async def read_body(receive_chunks: Any, declared: str | None, limits: Limits) -> bytes:
    """The body from an async iterator of chunks, never holding more than the cap, within the deadline."""
    cap = limits.max_body
    too_big = LimitExceeded(413, f"request body over this server's --max-body-mb {limits.max_body_mb}")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise too_big
    parts: list[bytes] = []
    size = 0
    deadline = time.monotonic() + limits.body_timeout_s
    iterator = receive_chunks.__aiter__()
    while True:
        left = deadline - time.monotonic()
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), timeout=max(left, 0.001))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise LimitExceeded(408, f"request body not received within {limits.body_timeout_s:g} s") from None
        size += len(chunk)
        if size > cap:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def check_bind(host: str, tokens: tuple[str, ...], insecure: bool) -> str | None:
    """Why this address must not be served without a token (None: fine)."""
    if tokens or insecure or is_loopback(host):
        return None
    return (f"--host {host}: other machines can reach this address and there is no --token; "
            "give --token (or MAGCACHE_TOKEN), or --insecure to serve it open anyway")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
