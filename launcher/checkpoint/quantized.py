"""Pre-quantized DiT files: detect them, check them, and read them back as what the model wants.

Formats (key names from their producers):
- ModelOpt FP8, diffusers layout (`nvidia/Wan2.2-*-Diffusers-FP8`; ModelOpt's `export_hf_checkpoint`
  and diffusers' `NVIDIAModelOptConfig`): `<layer>.weight` float8_e4m3fn, `<layer>.weight_scale`
  float32 (per tensor: shape [] or [1]), optional `<layer>.input_scale` (a static activation scale).
- ComfyUI "fp8_scaled" single file (ComfyUI's `scaled_fp8` loader, kijai's WanVideoWrapper files),
  official key names, optionally under `model.diffusion_model.`: `<layer>.weight` float8_e4m3fn,
  `<layer>.scale_weight` float32 per tensor, optional `<layer>.scale_input`, and a `scaled_fp8` marker
  tensor. Drop it into an official-layout expert folder as `diffusion_pytorch_model.safetensors`.
- Our own (`magcache-launch quantize`): `<layer>.weight` float8_e4m3fn or int8 with a per-output-channel
  `<layer>.weight_scale` [rows].

In every format the scale multiplies back: `w = q * scale`. Activation scales stored by a producer
are not used: our activations are scaled per token at each forward. The companion tensors are split
off the model's tensors at inspection (so the usual shape check sees a plain model), and
`PrequantizedSource` answers a quantized layer's rows as stored (no second rounding) and any other
layer dequantized to float32.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.sources import TensorSource, WrappingSource, WeightFiles, open_source
from quant.linear import dequantize_rows

#: companion suffix -> what it is
SCALE_SUFFIXES = {".weight_scale": "weight", ".scale_weight": "weight", ".input_scale": "input", ".scale_input": "input"}
MARKER = "scaled_fp8"
#: ComfyUI's single-file prefix of the diffusion model's tensors
SINGLE_FILE_PREFIX = "model.diffusion_model."
#: safetensors dtype -> quantization mode of a weight stored in it
MODE_OF_DTYPE = {"F8_E4M3": "fp8", "I8": "int8"}


@dataclass(frozen=True, slots=True)
class Prequantized:
    """What an expert's file holds beyond a plain model."""

    format: str
    #: target weight key -> (mode of its stored bytes, target key of its scale)
    weights: Mapping[str, tuple[str, str]]
    #: the scale tensors (target keys), readable with `open_source`
    scales: WeightFiles

    @property
    def modes(self) -> set[str]:
        return {mode for mode, _ in self.weights.values()}


def _header_dtypes(paths: set[Path]) -> dict[tuple[Path, str], str]:
    out: dict[tuple[Path, str], str] = {}
    for path in paths:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        out.update({(path, k): v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def split_prequantized(weights: WeightFiles, where: Path, layout: str) -> tuple[WeightFiles, Prequantized | None]:
    """(the model's own tensors, what is quantized) of one expert; a broken file is refused in one line."""
    if weights.kind != "safetensors":
        return weights, None
    companions = {k: suffix for k in weights.shapes for suffix in SCALE_SUFFIXES if k.endswith(suffix)}
    marker = MARKER in weights.shapes
    dtypes = _header_dtypes(set(weights.files))
    dtype_of = {k: dtypes[weights.locations[k]] for k in weights.shapes}
    low_bit = {k: MODE_OF_DTYPE[d] for k, d in dtype_of.items()
               if d in MODE_OF_DTYPE and k not in companions and k != MARKER}
    if not companions and not marker and not low_bit:
        return weights, None
    stored = lambda k: f"{weights.locations[k][0].name}: tensor {weights.locations[k][1]!r}"  # noqa: E731
    scale_of: dict[str, str] = {}
    for key, suffix in companions.items():
        owner = key[: -len(suffix)] + ".weight"
        if owner not in weights.shapes:
            raise CheckpointError(f"{where}/{stored(key)} scales a weight the file does not hold ({owner!r}); "
                                  "the file is truncated or broken, re-download or re-quantize it")
        if dtype_of[key] not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{where}/{stored(key)} is {dtype_of[key]}, not a float scale; the file is broken, "
                                  "re-download or re-quantize it")
        if SCALE_SUFFIXES[suffix] == "weight":
            rows = weights.shapes[owner][0]
            if tuple(weights.shapes[key]) not in ((), (1,), (rows,), (rows, 1)):
                raise CheckpointError(f"{where}/{stored(key)} has shape {list(weights.shapes[key])}; a scale of "
                                      f"{owner!r} is one value or one per row ({rows}); the file is broken")
            scale_of[owner] = key
    for key, mode in low_bit.items():
        if key not in scale_of and (scale_of or mode == "int8"):
            raise CheckpointError(f"{where}/{stored(key)} is {dtype_of[key]} without a scale while "
                                  f"{'others have one' if scale_of else 'int8 needs one'}; the file is broken, "
                                  "re-download or re-quantize it")
    for key in scale_of:
        if key not in low_bit:
            raise CheckpointError(f"{where}/{stored(key)} has a scale but is stored {dtype_of[key]}, not fp8 or int8; "
                                  "the file mixes formats, re-download or re-quantize it")
    if marker and not scale_of:
        raise CheckpointError(f"{where}: a ComfyUI fp8_scaled file ({MARKER!r} marker) without any scale_weight; "
                              "the file is broken, re-download it")
    if any(s.endswith(".scale_weight") for s in scale_of.values()) or marker:
        fmt = "comfyui-fp8-scaled"
    elif layout == "diffusers" and all(len(weights.shapes[s]) <= 1 and
                                       (weights.shapes[s] in ((), (1,))) for s in scale_of.values()):
        fmt = "modelopt-fp8" if set(low_bit.values()) == {"fp8"} else "per-tensor-8bit"
    else:
        fmt = "per-channel-" + "+".join(sorted(set(low_bit.values())))
    # 8-bit weights without any scale (a plain fp8 cast) have scale 1
    entries = {k: (mode, scale_of.get(k, "")) for k, mode in low_bit.items()}
    drop = set(companions) | ({MARKER} if marker else set())
    model = WeightFiles(kind=weights.kind, locations={k: v for k, v in weights.locations.items() if k not in drop},
                        shapes={k: v for k, v in weights.shapes.items() if k not in drop})
    scales = WeightFiles(kind=weights.kind, locations={k: weights.locations[k] for k in scale_of.values()},
                         shapes={k: weights.shapes[k] for k in scale_of.values()})
    return model, Prequantized(format=fmt, weights=entries, scales=scales)


class PrequantizedSource(WrappingSource):
    """A model source over a pre-quantized file: 8-bit weights come back dequantized (float32) from
    `get`/`get_slice`, or as stored from `quantized_rows` (used by `quant.source.QuantizingSource`)."""

    def __init__(self, base: TensorSource, pre: Prequantized) -> None:
        super().__init__(base)
        self._pre = pre
        self._scales = open_source(pre.scales)

    def close(self) -> None:
        self._scales.close()

    def _scale_rows(self, key: str, rows: torch.Tensor, start: int | None, stop: int | None) -> torch.Tensor:
        scale_key = self._pre.weights[key][1]
        if not scale_key:
            return torch.ones(rows.shape[0])
        scale = self._scales.get(scale_key).float().reshape(-1)
        if scale.numel() == 1:
            return scale.expand(rows.shape[0]).clone()
        return scale if start is None else scale[start:stop]

    def _read(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        return self._base.get(key) if start is None else self._base.get_slice(key, start, stop)

    def quantized_rows(self, key: str, start: int | None, stop: int | None,
                       mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(stored 8-bit rows, float32 per-row scales) when `key` is stored in `mode`; else None."""
        if self._pre.weights.get(key, ("", ""))[0] != mode:
            return None
        rows = self._read(key, start, stop)
        return rows, self._scale_rows(key, rows, start, stop)

    def _answer(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        rows = self._read(key, start, stop)
        if key not in self._pre.weights:
            return rows
        return dequantize_rows(rows, self._scale_rows(key, rows, start, stop))

    def get(self, key: str) -> torch.Tensor:
        return self._answer(key, None, None)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._answer(key, start, stop)


def prequantized_source(base: TensorSource, pre: Prequantized | None) -> Any:
    return PrequantizedSource(base, pre) if pre is not None else base
