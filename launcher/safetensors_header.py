"""The one reader of a safetensors header: key -> dtype, shape and byte range, without reading a tensor.

Checkpoint inspection (`checkpoint.files`), the row reader (`checkpoint.sources`) and the checks made
before torch is imported (`preflight`, which LoRA resolution uses too) all read headers through here,
then word a failure for their own reader (re-download the checkpoint, give a .safetensors LoRA).
Bytes, `struct` and `json` only: importing it costs nothing. The format: 8 bytes little-endian header length, the JSON header, the data.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: a header longer than this is not a header (the format's own readers cap it the same way)
MAX_HEADER_BYTES = 100_000_000


class NotSafetensors(ValueError):
    """Why a file is not a whole safetensors file (the caller adds what to do about it)."""

    def __init__(self, reason: str, *, pickle: bool = False) -> None:
        super().__init__(reason)
        #: the file is a pickle (torch .pt/.ckpt), which can run code when loaded
        self.pickle = pickle


@dataclass(frozen=True, slots=True)
class Header:
    #: byte offset of the data section (tensor byte ranges count from here)
    data_start: int
    #: key -> {"dtype", "shape", "data_offsets"} as stored (the `__metadata__` entry left out)
    tensors: dict[str, dict[str, Any]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.tensors.items()}


def read_header(path: str | Path) -> Header:
    """The header of `path`; NotSafetensors if it is not one (or is cut short), OSError if unreadable."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise NotSafetensors("a pickle (torch .pt/.ckpt), which can run code when loaded", pickle=True)
        if len(head) < 8:
            raise NotSafetensors("too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise NotSafetensors("bad header length, not a safetensors file")
        raw = f.read(length)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < length:
        raise NotSafetensors("truncated (the header is cut short)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotSafetensors(f"unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise NotSafetensors("the header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        for v in tensors.values():
            str(v["dtype"]), [int(d) for d in v["shape"]]
    except (KeyError, TypeError, ValueError, IndexError):
        raise NotSafetensors("malformed header (an entry lacks dtype, shape or data_offsets)") from None
    if 8 + length + end > size:
        raise NotSafetensors(f"truncated ({size} bytes, the header describes {8 + length + end})")
    return Header(data_start=8 + length, tensors=tensors)
