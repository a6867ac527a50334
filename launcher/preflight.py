"""What file headers alone can refuse, checked with the flags, before torch or diffusers are imported.

Those imports cost 8 s on an idle machine and 15-30 s on a loaded one; a shard missing from an
interrupted download, a truncated file or a LoRA that is a pickle needs none of them. Reading is
bytes, `struct` and `json` only: a safetensors header (8-byte length, then JSON) and the end of a
zip archive. The full checks (key names, shapes against the model) follow in `launcher.checkpoint`.
"""
from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

from launcher.errors import InputError

#: a real safetensors header is at most a few MB; anything larger is not one
_MAX_HEADER = 100_000_000


class HeaderError(InputError):
    """A file whose header already shows it cannot be used: one line naming it, exit 2."""


def safetensors_header(path: Path, *, what: str = "safetensors", todo: str = "re-download it") -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file holds every byte it declares."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise HeaderError(f"{path}: a pickle (torch .pt/.ckpt), which can run code when loaded; only "
                                  f".safetensors are read, convert it with safetensors.torch.save_file")
            if len(head) < 8:
                raise HeaderError(f"{path}: not a {what} file (too short); {todo}")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                raise HeaderError(f"{path}: not a {what} file (bad header length); {todo}")
            header = json.loads(f.read(length))
            size = f.seek(0, 2)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path}: unreadable as {what} ({type(e).__name__}); {todo}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: not a {what} file; {todo}")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2]
    need = 8 + length + max(ends, default=0)
    if size < need:
        raise HeaderError(f"{path}: truncated ({size} of {need} bytes); {todo}")
    return header


def check_pth_whole(path: Path) -> None:
    """A torch zip archive cut short (an interrupted download) has its first header but not its end."""
    import zipfile

    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"
    if starts_like_zip and not zipfile.is_zipfile(path):
        raise HeaderError(f"{path}: truncated ({path.stat().st_size} bytes, the end of the archive is missing); "
                          "re-download it")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise HeaderError(f"{index}: unreadable index; re-download the checkpoint") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HeaderError(f"{index}: no weight_map; re-download the checkpoint")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


@lru_cache(maxsize=8)
def check_checkpoint_files(root: Path) -> None:
    """Every shard an index lists is present and whole, every safetensors and .pth file is whole.

    Looks at the checkpoint folder and its subfolders (both layouts keep their files there); what
    is missing altogether (no VAE at all) is named later, by `inspect_checkpoint`."""
    if not root.is_dir():
        return  # the flag check says so
    for index in sorted([*root.glob("*.safetensors.index.json"), *root.glob("*/*.safetensors.index.json")]):
        for shard in _shards(index):
            if not shard.is_file():
                raise HeaderError(f"{shard}: shard listed in {index.name} is missing; download the missing shard")
    for file in sorted([*root.glob("*.safetensors"), *root.glob("*/*.safetensors")]):
        safetensors_header(file)
    for file in sorted([*root.glob("*.pth"), *root.glob("*/*.pth")]):
        check_pth_whole(file)


def lora_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of a LoRA file; a pickle, a truncated or a non-safetensors file is refused."""
    header = safetensors_header(path, what="safetensors", todo="give a .safetensors LoRA")
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
