"""Lazy, read-only access to checkpoint tensors under their *target* (diffusers/transformers) names.

A source never materialises a whole model: safetensors are memory-mapped by `safe_open` and `.pth`
files by `torch.load(mmap=True, weights_only=True)`, so a rank can read just its rows of a tensor
(`get_slice`) when loading sharded. Knows nothing of Wan: the caller supplies the key map.
"""
from __future__ import annotations

from collections.abc import KeysView, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import torch


@dataclass(frozen=True, slots=True)
class WeightFiles:
    """Where each target key of one model lives and its shape: all a source needs, read from headers only."""

    kind: Literal["safetensors", "pth", "shapes"]
    #: target key -> (file, key inside that file); empty for "shapes" (`plan --dry-run`: no file at all)
    locations: Mapping[str, tuple[Path, str]]
    #: target key -> shape as stored
    shapes: Mapping[str, tuple[int, ...]]
    #: "shapes" only: the dtype the tensors are stored in (what a read would allocate on the host)
    stored_dtype: torch.dtype | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(sorted({path for path, _ in self.locations.values()}))


class TensorSource(Protocol):
    """Target key -> tensor on the CPU, read on demand. Use as a context manager to release mmaps."""

    def keys(self) -> KeysView[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...
    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor: ...
    def close(self) -> None: ...
    def __enter__(self) -> TensorSource: ...
    def __exit__(self, *exc: Any) -> None: ...


class WrappingSource:
    """A source over another one (`base`): entering enters the base; leaving releases what the wrapper
    holds itself (`close`, overridden by wrappers that hold files), then leaves the base. Tensors the
    wrapper passes through are the base's, so it inherits the base's `fresh_tensors`."""

    def __init__(self, base: TensorSource) -> None:
        self._base = base
        self.fresh_tensors = getattr(base, "fresh_tensors", False)

    def __enter__(self) -> Any:
        self._base.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._base.__exit__(*exc)

    def close(self) -> None:
        """What the wrapper itself holds (nothing by default; the base is released by `__exit__`)."""

    def keys(self) -> KeysView[str]:
        return self._base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._base.shape(key)


class _SourceBase:
    def __init__(self, weights: WeightFiles) -> None:
        self._weights = weights

    def keys(self) -> KeysView[str]:
        return self._weights.shapes.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._weights.shapes[key]

    def __enter__(self) -> _SourceBase:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_rows(self, key: str, start: int, stop: int) -> None:
        rows = self.shape(key)[0] if self.shape(key) else 0
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for {key!r} with {rows} rows")


#: safetensors dtype names -> torch dtypes (the format's own table)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsSource(_SourceBase):
    """Reads rows of safetensors shards with plain positioned reads into fresh CPU memory.

    Not `safe_open`: its tensors are views of a shared memory map, so every byte a rank touches
    stays in its RSS as file-backed pages until the file is unmapped (a sharded load showed
    its rows twice, once mapped and once copied), and a module keeping a view keeps the file
    mapped. A positioned read of exactly the rows asked for holds only those rows.
    """

    #: every tensor handed out owns fresh memory (no view of a mapping): loaders need not copy
    fresh_tensors = True

    def __init__(self, weights: WeightFiles) -> None:
        super().__init__(weights)
        self._files: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}

    def _entry(self, key: str) -> tuple[Any, int, dict[str, Any]]:
        from launcher.safetensors_header import read_header

        path, stored = self._weights.locations[key]
        if path not in self._files:
            header = read_header(path)  # checked whole at inspection (files.read_safetensors)
            self._headers[path] = (header.data_start, header.tensors)
            self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open until close()
        base, header = self._headers[path]
        return self._files[path], base, header[stored]

    def _read_rows(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        f, base, entry = self._entry(key)
        dtype, shape = _ST_DTYPES[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        if start is not None and shape:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        f.seek(base + begin)
        got = f.readinto(view)
        if got != end - begin:
            raise OSError(f"{f.name}: truncated while reading {key!r} ({got} of {end - begin} bytes)")
        return buf.view(dtype).reshape(shape)

    def get(self, key: str) -> torch.Tensor:
        return self._read_rows(key, None, None)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        self._check_rows(key, start, stop)
        return self._read_rows(key, start, stop)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._headers.clear()


def load_pth_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict without running pickled code; mmap-backed when the file is a torch zip archive."""
    import zipfile

    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6) files cannot be mapped; they load eagerly
    state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError("not a flat dict of tensors")
    return state


class PthSource(_SourceBase):
    """Reads from one `.pth` state dict; the file is mapped once, on first use."""

    def __init__(self, weights: WeightFiles) -> None:
        super().__init__(weights)
        self._state: dict[str, torch.Tensor] | None = None

    def _tensor(self, key: str) -> torch.Tensor:
        path, stored = self._weights.locations[key]
        if self._state is None:
            self._state = load_pth_state_dict(path)
        return self._state[stored]

    def get(self, key: str) -> torch.Tensor:
        return self._tensor(key)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        self._check_rows(key, start, stop)
        return self._tensor(key)[start:stop]

    def close(self) -> None:
        self._state = None


class ShapeSource(_SourceBase):
    """Tensors with the stored shapes and dtype and no data: `torch.empty`, which under the dry run's
    FakeTensorMode allocates nothing (`launcher.engine.dryrun`); nothing is read."""

    fresh_tensors = True

    def get(self, key: str) -> torch.Tensor:
        return torch.empty(self.shape(key), dtype=self._weights.stored_dtype)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        self._check_rows(key, start, stop)
        return torch.empty((stop - start, *self.shape(key)[1:]), dtype=self._weights.stored_dtype)

    def close(self) -> None:
        pass


def open_source(weights: WeightFiles) -> TensorSource:
    """The reader for this kind of file."""
    if weights.kind == "shapes":
        return ShapeSource(weights)
    if weights.kind == "pth" and len(weights.files) > 1:
        raise ValueError("a .pth source reads one file; got several")
    return SafetensorsSource(weights) if weights.kind == "safetensors" else PthSource(weights)
