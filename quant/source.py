"""A tensor source that hands out chosen weights quantized, row-locally.

Wraps any source with `keys/shape/get/get_slice` (the launcher's checkpoint sources, a LoRA-merging
source): for each weight named in `targets` it answers the 8-bit weight under the same key and a
float32 `<layer>.weight_scale` [rows] beside it. A row range quantizes on its own (one scale per row),
so an FSDP rank that asks for its rows gets exactly those rows of the one-process result.

A base source may already hold the 8-bit rows (a pre-quantized checkpoint): when it offers
`quantized_rows(key, start, stop, mode)` returning (weight, scale), they pass through unchanged.
"""
from __future__ import annotations

from collections.abc import KeysView, Mapping
from typing import Any

import torch

from quant.linear import quantize_rows

SCALE_SUFFIX = "_scale"  # `<layer>.weight` -> `<layer>.weight_scale`


def scale_key(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


class QuantizingSource:
    """`base` with the `targets` weights ({key: 'fp8' | 'int8'}) quantized and their scales added."""

    def __init__(self, base: Any, targets: Mapping[str, str]) -> None:
        self._base = base
        self._targets = dict(targets)
        self._scales = {scale_key(k): k for k in self._targets}
        self.fresh_tensors = getattr(base, "fresh_tensors", False)  # pass-through tensors are the base's
        self._keys = {k: None for k in (*base.keys(), *self._scales)}
        self._last: tuple[tuple[str, int | None, int | None], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __enter__(self) -> "QuantizingSource":
        self._base.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._last = None
        self._base.__exit__(*exc)

    def close(self) -> None:
        self._last = None
        self._base.close()

    def keys(self) -> KeysView[str]:
        return self._keys.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._scales:
            return (self._base.shape(self._scales[key])[0],)
        return self._base.shape(key)

    def _rows(self, weight_key: str, start: int | None, stop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(8-bit rows, scales) of one weight; the weight and its scale are read back to back, so one is cached."""
        ident = (weight_key, start, stop)
        if self._last is not None and self._last[0] == ident:
            return self._last[1]
        mode = self._targets[weight_key]
        stored = getattr(self._base, "quantized_rows", None)
        pair = stored(weight_key, start, stop, mode) if stored is not None else None
        if pair is None:
            rows = (self._base.get(weight_key) if start is None
                    else self._base.get_slice(weight_key, start, stop))
            pair = quantize_rows(rows, mode)
        self._last = (ident, pair)
        return pair

    def _answer(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        if key in self._targets:
            return self._rows(key, start, stop)[0]
        if key in self._scales:
            return self._rows(self._scales[key], start, stop)[1]
        return self._base.get(key) if start is None else self._base.get_slice(key, start, stop)

    def get(self, key: str) -> torch.Tensor:
        return self._answer(key, None, None)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._answer(key, start, stop)


def quantizing(base: Any, targets: Mapping[str, str]) -> Any:
    """`base` itself when nothing is quantized, else the quantizing wrapper."""
    return QuantizingSource(base, targets) if targets else base
