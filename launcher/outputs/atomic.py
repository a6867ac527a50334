"""Files that appear whole or not at all, and the small file helpers the outputs share.

Every file is written to a hidden temp name in the destination directory and renamed into place,
so an interrupted or failed run never leaves a half-written output under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it over `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(final, suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()



def _create_beside(final: Path, suffix: str) -> Path:
    """A new empty hidden file beside `final`, created with mode 0666 so the kernel applies the
    caller's umask: the renamed output gets the mode a plain `open(final, "w")` would give it
    (`tempfile.mkstemp` would make every output 0600, unreadable to colleagues and web servers)."""
    while True:
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(Path(path), suffix=".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path_for(video_path: Path) -> Path:
    """The manifest sits beside the video: `clip.mp4` -> `clip.json`."""
    return Path(video_path).with_suffix(".json")
