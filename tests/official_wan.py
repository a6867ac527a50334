"""The official Wan2.2 WanModel (PyPI `wan22` 2.2.11 = GitHub Wan-Video/Wan2.2 42bf4cf), runnable on CPU.

Only two things are changed, both at the call boundary and only while official code runs:
- its hard-coded `torch.amp.autocast('cuda', ...)` regions go to the CPU device, so its float32
  regions (time embedding, modulation, residual adds, head) act under CPU autocast as on CUDA;
- its `flash_attention` (CUDA only) becomes SDPA with flash-attention's own dtype handling:
  q, k, v cast to half (`half()` with its default bfloat16) and the output cast back to q's dtype.

`wan/__init__.py` imports the speech/animate pipelines and their heavy extras, so the package and
`wan.modules` are registered as bare namespaces and only `wan/modules/model.py` (+ attention.py) run.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

_REAL_AUTOCAST = torch.amp.autocast


def _cpu_autocast(device_type: str, *args, **kwargs):
    return _REAL_AUTOCAST("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


@contextlib.contextmanager
def cuda_autocast_on_cpu():
    """While official code runs, its `torch.amp.autocast('cuda', ...)` means the CPU device."""
    torch.amp.autocast = _cpu_autocast
    try:
        yield
    finally:
        torch.amp.autocast = _REAL_AUTOCAST


def _flash_attention_as_sdpa(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                             causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                             version=None):
    """Official `flash_attention`'s dtype contract (half inputs, output in q's dtype) on torch SDPA.

    Only full-length sequences are passed here (no k_lens masking needed): the tests give
    `seq_len` equal to the real token count and the text context is attended in full, as official."""
    out_dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    q, k, v = (x if x.dtype in half else x.to(dtype) for x in (q, k, v))
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                       is_causal=causal).transpose(1, 2)
    return x.type(out_dtype)


def official_model_module():
    """`wan.modules.model` from the installed `wan22` package, or skip when it is not installed."""
    if "wan.modules.model" in sys.modules:
        return sys.modules["wan.modules.model"]
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the official Wan2.2 package is not installed (scripts/setup.sh installs wan22==2.2.11)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("wan", root), ("wan.modules", root / "modules")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    with cuda_autocast_on_cpu():  # its rope helpers are decorated with autocast('cuda') at import
        module = importlib.import_module("wan.modules.model")
    module.flash_attention = _flash_attention_as_sdpa
    return module


def load_official_dit(folder: Path) -> torch.nn.Module:
    """Official WanModel with an official-layout DiT folder's config and weights.

    The official config ignores `text_dim` (always 4096 there); the tiny checkpoints' T5 is
    narrower, so it is read from the weights."""
    om = official_model_module()
    config = json.loads((folder / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    keys = ("model_type", "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim",
            "text_len")
    model = om.WanModel(text_dim=state["text_embedding.0.weight"].shape[1], **{k: config[k] for k in keys})
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def official_forward(model: torch.nn.Module, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     y: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One official forward of a single sample, under CPU autocast to `autocast_dtype` (None: none).

    `t`: [1] or per token [1, L]; `context`: the trimmed T5 rows [n, text_dim] (official pads)."""
    seq_len = latent.shape[1] * latent.shape[2] * latent.shape[3] // 4
    amp = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext())
    with cuda_autocast_on_cpu(), amp:
        return model([latent], t=t, context=[context], seq_len=seq_len, y=None if y is None else [y])[0].float()
