"""What file headers alone can refuse, checked with the flags, before torch or diffusers are imported.

Those imports cost 8 s on an idle machine and 15-30 s on a loaded one; a shard missing from an
interrupted download, a truncated file or a LoRA that is a pickle needs none of them. Reading is
bytes, `struct` and `json` only: a safetensors header (8-byte length, then JSON) and the end of a
zip archive. The full checks (key names, shapes against the model) follow in `launcher.checkpoint`.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from launcher.errors import InputError
from launcher.safetensors_header import NotSafetensors, read_header


class HeaderError(InputError):
    """A file whose header already shows it cannot be used: one line naming it, exit 2."""


def safetensors_header(path: Path, *, what: str = "safetensors", todo: str = "re-download it") -> dict[str, Any]:
    """The tensors of a safetensors header (key -> dtype, shape, data_offsets), after checking the file
    holds every byte it declares (`launcher.safetensors_header`, worded for the caller's reader)."""
    try:
        return read_header(path).tensors
    except NotSafetensors as e:
        if e.pickle:
            raise HeaderError(f"{path}: a pickle (torch .pt/.ckpt), which can run code when loaded; only "
                              f".safetensors are read, convert it with safetensors.torch.save_file") from None
        raise HeaderError(f"{path}: {e}; {todo}") from None
    except OSError as e:
        raise HeaderError(f"{path}: unreadable as {what} ({type(e).__name__}); {todo}") from None


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
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
