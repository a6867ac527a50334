"""A linear layer with 8-bit weights, and the row-local quantizer that fills it.

Weights: one scale per output channel (row), `w ~= q * scale[:, None]`, so any block of rows
quantizes on its own: an FSDP rank quantizes only the rows it holds, and the all-gathered rows
plus scales are exactly what one process would have made. Activations: one scale per token, taken
at each forward from the token's absolute maximum (dynamic), so nothing needs calibrating.

fp8: `torch._scaled_mm(x_fp8, w_fp8.T, scale_a=[M, 1], scale_b=[1, N])` (row-wise scaling; on CUDA
it needs sm89+, K and N multiples of 16 and a bfloat16 output). int8 (w8a8, for GPUs without FP8):
`torch._int_mm(x_int8, w_int8.T)` accumulates in int32, then both scales apply in float32 (on CUDA
it needs more than 16 rows: fewer are zero-padded). Both run on the CPU, which is how the tests
exercise the same code path a GPU runs.

Outside the low-precision part of a schedule (`Precision.low` False) the layer multiplies in the
compute dtype with its dequantized weight: the activations are not quantized, the weight rounding
stays (the memory stays 8-bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Mode = Literal["fp8", "int8"]
MODES: tuple[Mode, ...] = ("fp8", "int8")

#: storage dtype and largest magnitude of each mode (int8 stays symmetric: -127..127)
STORAGE: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX: dict[str, float] = {"fp8": float(torch.finfo(torch.float8_e4m3fn).max), "int8": 127.0}
_TINY = 1e-12


def _to_storage(x: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 values already divided by their scale -> the mode's storage dtype (saturating)."""
    x = x.clamp(-QMAX[mode], QMAX[mode])
    return x.to(torch.float8_e4m3fn) if mode == "fp8" else x.round().to(torch.int8)


def quantize_rows(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, in] weight -> (8-bit weight [rows, in], float32 scale [rows]); each row on its own.

    An all-zero row gets scale 1 (its quantized row is zero either way)."""
    w = weight.float()
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / QMAX[mode], torch.ones_like(amax))
    return _to_storage(w / scale[:, None], mode), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an 8-bit weight and its per-row (or one per-tensor) scale stand for."""
    scale = scale.float().reshape(-1)
    return q.float() * (scale[:, None] if scale.numel() > 1 else scale)


def _quantize_tokens(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (8-bit [M, K], float32 per-token scale [M, 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / QMAX[mode]
    return _to_storage(xf / scale, mode), scale


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, K] activations times an fp8 [N, K] weight with per-row `scale` [N] -> [M, N] in `out_dtype`."""
    xq, xs = _quantize_tokens(x, "fp8")
    # cuBLASLt's row-wise scaling writes bfloat16 only: a float32 run gets the bf16 product widened
    direct = out_dtype if not xq.is_cuda else torch.bfloat16
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.float()[None, :], out_dtype=direct)
    return y.to(out_dtype)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, K] activations times an int8 [N, K] weight with per-row `scale` [N] -> [M, N] in `out_dtype`."""
    xq, xs = _quantize_tokens(x, "int8")
    rows = xq.shape[0]
    if xq.is_cuda and rows <= 16:  # cuBLASLt's int8 GEMM wants M > 16
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    acc = torch._int_mm(xq, weight.t())[:rows]
    return (acc.float() * xs * scale.float()[None, :]).to(out_dtype)


_MATMUL = {"fp8": fp8_matmul, "int8": int8_matmul}


@dataclass
class Precision:
    """Shared by the quantized layers of one model: False runs them on dequantized weights."""

    low: bool = True


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class QuantLinear(nn.Module):
    """`nn.Linear` with an 8-bit `weight` [out, in], a float32 `weight_scale` [out] and the bias as given.

    The parameters are plain (no tensor subclass), so a state dict holds the 8-bit bytes and the
    scales, and FSDP2 shards and all-gathers them as stored (`fsdp_keep_dtype`: a sharder must not
    cast them to its mixed-precision dtype).
    """

    #: parameters travel as stored: casting an 8-bit weight to bf16 for the all-gather would double it
    fsdp_keep_dtype = True

    def __init__(self, in_features: int, out_features: int, *, mode: str, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 precision: Precision | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r}; expected one of {MODES}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=STORAGE[mode], device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.precision = precision if precision is not None else Precision()

    @classmethod
    def like(cls, linear: nn.Linear, mode: str, precision: Precision | None = None) -> "QuantLinear":
        """An empty quantized twin of `linear`, on its device (meta stays meta); weights are not copied."""
        bias = linear.bias
        return cls(linear.in_features, linear.out_features, mode=mode, bias=bias is not None,
                   bias_dtype=bias.dtype if bias is not None else torch.float32, device=linear.weight.device,
                   precision=precision)

    def load_from(self, linear: nn.Linear) -> "QuantLinear":
        """Quantize `linear`'s weight into this layer (rows are independent: any row block would do)."""
        q, scale = quantize_rows(linear.weight.detach(), self.mode)
        with torch.no_grad():
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)
            if self.bias is not None:
                self.bias.copy_(linear.bias.detach())
        return self

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = _compute_dtype(x)
        if not self.precision.low:
            bias = self.bias.to(out_dtype) if self.bias is not None else None
            return F.linear(x.to(out_dtype), self.dequantized(out_dtype), bias)
        flat = x.reshape(-1, self.in_features)
        with torch.autocast(x.device.type, enabled=False):
            y = _MATMUL[self.mode](flat, self.weight, self.weight_scale, out_dtype)
            if self.bias is not None:
                y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"
