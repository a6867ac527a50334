"""The attention kernel: which one runs (`--attention`), and the calls, with and without the LSE.

`auto` takes the first that can run here, in official Wan2.2's order of preference and then
speed: FlashAttention-3 (`flash_attn_interface`, Hopper sm90 only), cuDNN attention through SDPA,
FlashAttention-2 (`flash_attn`), then torch SDPA (whatever kernel it picks). The half-precision
kernels need CUDA and fp16/bf16 q, k, v; a float32 run or the CPU gets SDPA. A kernel asked for by
name that cannot run is refused in one line (exit 2), never silently replaced.

Every kernel has two calls on [B, S, H, D] tensors: `attend` (the output) and `attend_with_lse`
(the output and its float32 log-sum-exp [B, H, Sq], which ring attention merges blocks with), so
the ring uses whichever kernel the run chose.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel.attention_choices import AUTO_ORDER, BACKENDS, PACKAGES, Backend  # noqa: F401 (BACKENDS re-exported)
_MODULES = PACKAGES


class AttentionBackendError(ValueError):
    """A kernel asked for by name cannot run here; the message says why and what to use."""


def check_self_attention(q: Tensor, k: Tensor, v: Tensor, valid_len: int | None, seq: int) -> int:
    """q, k, v of one shape (self-attention) and 0 < valid_len <= seq; returns the keys to keep."""
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape for self-attention, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    keep = seq if valid_len is None else valid_len
    if not 0 < keep <= seq:
        raise ValueError(f"valid_len {valid_len} must be in 1..{seq} (the padded sequence length)")
    return keep


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _cudnn_sdpa() -> bool:
    return bool(torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled())


@dataclass(frozen=True, slots=True)
class Host:
    """What decides which kernels can run: the device, the dtype of q/k/v, the GPU's compute capability."""

    device_type: str
    half: bool
    capability: tuple[int, int] | None = None

    @classmethod
    def of(cls, device: torch.device, dtype: torch.dtype) -> Host:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None
        return cls(device.type, dtype in (torch.float16, torch.bfloat16), cap)


def why_not(name: str, host: Host, *, importable: Callable[[str], bool] = _importable,
            cudnn: Callable[[], bool] = _cudnn_sdpa) -> str | None:
    """None when kernel `name` can run on `host`, else the reason it cannot (for the refusal line)."""
    if name == "sdpa":
        return None
    if host.device_type != "cuda":
        return f"it runs on CUDA only and this run is on {host.device_type}"
    if not host.half:
        return "it takes fp16/bf16 q, k, v and this run computes in float32 (pass --dtype bfloat16)"
    if name == "flash3" and host.capability != (9, 0):
        return f"FlashAttention-3 runs on Hopper (sm90) and this GPU is sm{''.join(map(str, host.capability or ()))}"
    if name == "cudnn":
        return None if cudnn() else "this torch build has no cuDNN attention (torch.backends.cuda.cudnn_sdp_enabled)"
    if not importable(_MODULES[name]):
        return f"the {_MODULES[name]} package is not installed (pip install '.[gpu]')"
    return None


def resolve(requested: str, host: Host, **probes: Callable) -> str:
    """The kernel that runs: `requested` itself (AttentionBackendError if it cannot), or auto's first."""
    if requested not in BACKENDS:
        raise AttentionBackendError(f"--attention {requested}: choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return next(n for n in AUTO_ORDER if why_not(n, host, **probes) is None)
    reason = why_not(requested, host, **probes)
    if reason is not None:
        raise AttentionBackendError(f"--attention {requested} cannot run here: {reason}; use --attention auto or sdpa")
    return requested


# --------------------------------------------------------------------------- the calls, [B, S, H, D]


def _bhsd(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in ts)


def attend(q: Tensor, k: Tensor, v: Tensor, kernel: str = "sdpa") -> Tensor:
    """Non-causal attention of [B, Sq, H, D] over [B, Sk, H, D] with `kernel` (a resolved name)."""
    if kernel in _MODULES:
        out = importlib.import_module(_MODULES[kernel]).flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)
    if kernel == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*_bhsd(q, k, v)).transpose(1, 2)
    return F.scaled_dot_product_attention(*_bhsd(q, k, v)).transpose(1, 2)


def attend_with_lse(q: Tensor, k: Tensor, v: Tensor, kernel: str = "sdpa") -> tuple[Tensor, Tensor]:
    """`attend` and its log-sum-exp [B, H, Sq] (float32), from the same kernel.

    SDPA does not return the LSE, so for "sdpa" this calls the kernel underneath it that does: on
    CPU the flash kernel SDPA itself runs (identical output), on CUDA torch's flash kernel (half
    dtypes) or its memory-efficient kernel (float32).
    """
    qt, kt, vt = _bhsd(q, k, v)
    if kernel == "flash2":
        out, lse, _ = importlib.import_module("flash_attn").flash_attn_func(q, k, v, return_attn_probs=True)
        return out, lse.float()
    if kernel == "flash3":
        fn = importlib.import_module("flash_attn_interface").flash_attn_func
        kw = {"return_attn_probs": True} if "return_attn_probs" in inspect.signature(fn).parameters else {}
        res = fn(q, k, v, **kw)
        return res[0], res[1].float()
    if kernel == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False)
        lse = res[1]
        return res[0].transpose(1, 2), (lse.squeeze(-1) if lse.dim() == 4 else lse).float()
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
        return out.transpose(1, 2), lse.float()
    if q.dtype in (torch.float16, torch.bfloat16):
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)
        return res[0].transpose(1, 2), res[1].float()
    res = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)
    return res[0].transpose(1, 2), res[1][..., : q.shape[1]].float()        # the LSE may be padded on Sq
