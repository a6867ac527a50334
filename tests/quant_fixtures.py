"""Tiny pre-quantized checkpoints, written the way their producers write them (tests only).

- ComfyUI "fp8_scaled" (ComfyUI's `scaled_fp8` loader, kijai's WanVideo files): one safetensors per
  expert with official key names under `model.diffusion_model.`, float8_e4m3fn block linears, a
  per-tensor `scale_weight` (shape []), `scale_input` 1.0, and the `scaled_fp8` marker tensor.
- ModelOpt FP8 in the diffusers layout: `weight` float8_e4m3fn, per-tensor `weight_scale` and
  `input_scale`, and `quantization_config` in the transformer's config.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
OFFICIAL_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                    "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
DIFFUSERS_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink(missing_ok=True)
    return state


def per_tensor_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().max() / torch.finfo(FP8).max
    return (w.float() / scale).to(FP8), scale.reshape(())


def _linear_weights(state: dict[str, torch.Tensor], linears: tuple[str, ...]) -> list[str]:
    return [k for k in state if k.startswith("blocks.") and k.endswith(".weight")
            and k.split(".", 2)[2][: -len(".weight")] in linears]


def make_comfy_fp8_scaled(src: Path, out: Path, folders=("high_noise_model", "low_noise_model")) -> Path:
    """A copy of an official-layout checkpoint whose experts are ComfyUI fp8_scaled files."""
    shutil.copytree(src, out)
    for name in folders:
        folder = out / name
        state = _read_folder(folder)
        quantized: dict[str, torch.Tensor] = {}
        for k in _linear_weights(state, OFFICIAL_LINEARS):
            q, scale = per_tensor_fp8(state[k])
            layer = k[: -len(".weight")]
            quantized[k] = q
            quantized[f"{layer}.scale_weight"] = scale
            quantized[f"{layer}.scale_input"] = torch.tensor(1.0)
        state.update(quantized)
        state["scaled_fp8"] = torch.empty(0, dtype=FP8)
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()},
                  folder / "diffusion_pytorch_model.safetensors")
    return out


def make_modelopt_fp8(src: Path, out: Path, folders=("transformer", "transformer_2")) -> Path:
    """A copy of a diffusers-layout checkpoint whose transformers are ModelOpt FP8 exports."""
    shutil.copytree(src, out)
    for name in folders:
        folder = out / name
        state = _read_folder(folder)
        for k in _linear_weights(state, DIFFUSERS_LINEARS):
            q, scale = per_tensor_fp8(state[k])
            layer = k[: -len(".weight")]
            state[k] = q
            state[f"{layer}.weight_scale"] = scale
            state[f"{layer}.input_scale"] = torch.tensor(0.05)
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "modelopt", "quant_type": "FP8"}
        (folder / "config.json").write_text(json.dumps(config))
    return out


def rewrite(folder: Path, edit) -> None:
    """Load the expert file in `folder`, let `edit(state)` break it, write it back."""
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
