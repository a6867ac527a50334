"""Tiny LoRA files in every format found in the wild, and a checkpoint merged by hand to compare with.

The official names come from the reference key list through diffusers' converter
(`wan_transformer_key_map`), not from the product's own reverse table, so the tests check it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from launcher.checkpoint.keymaps import invert, wan_transformer_key_map

REFERENCE = Path(__file__).resolve().parent / "reference"

#: our (diffusers) module names a low-rank test LoRA changes
LOWRANK_MODULES = ("blocks.0.attn1.to_q", "blocks.1.attn2.to_out.0", "blocks.0.ffn.net.0.proj", "proj_out",
                   "patch_embedding", "condition_embedder.time_proj")
#: our parameter names a full-delta test LoRA changes (weights, biases, norms, a bare parameter)
DIFF_PARAMS = ("blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.1.attn1.to_v.bias",
               "blocks.0.scale_shift_table", "blocks.1.ffn.net.2.weight", "blocks.1.scale_shift_table")
#: written as LightX2V's extractor does: `blocks.N.diff_m` for `blocks.N.modulation`
DIFF_M_PARAMS = ("blocks.1.scale_shift_table",)
FORMATS = ("peft-official", "peft-diffusers", "kohya", "diff")


def official_of(task: str) -> dict[str, str]:
    """our parameter name -> official WanModel name, for the tiny model's keys."""
    keys = json.loads((REFERENCE / f"official_wanmodel_{task}.json").read_text())["keys"]
    return invert(wan_transformer_key_map(keys))


def make_lora(path: Path, fmt: str, shapes: dict[str, tuple[int, ...]], task: str, *, rank: int = 3,
              alpha: float | None = 6.0, seed: int = 0) -> Path:
    """Write a LoRA in `fmt`; values are random so every merged weight really changes."""
    g = torch.Generator().manual_seed(seed)
    official = official_of(task)
    state: dict[str, torch.Tensor] = {}
    if fmt == "diff":
        for p in DIFF_PARAMS:
            off = official[p]
            name = off[: -len(".modulation")] + ".diff_m" if p in DIFF_M_PARAMS else \
                off[: -len(".weight")] + ".diff" if off.endswith(".weight") else \
                off[: -len(".bias")] + ".diff_b" if off.endswith(".bias") else off + ".diff"
            state[f"diffusion_model.{name}"] = torch.randn(shapes[p], generator=g) * 0.1
    else:
        for module in LOWRANK_MODULES:
            w = shapes[module + ".weight"]
            down = torch.randn((rank, *w[1:]), generator=g) * 0.2
            up = torch.randn((w[0], rank, *([1] * (len(w) - 2))), generator=g) * 0.2
            off = official[module + ".weight"][: -len(".weight")]
            if fmt == "peft-official":
                base, a, b = f"diffusion_model.{off}", "lora_A.weight", "lora_B.weight"
            elif fmt == "peft-diffusers":
                base, a, b = f"transformer.{module}", "lora_A.weight", "lora_B.weight"
            elif fmt == "kohya":
                base, a, b = "lora_unet_" + off.replace(".", "_"), "lora_down.weight", "lora_up.weight"
            else:
                raise ValueError(fmt)
            state[f"{base}.{a}"], state[f"{base}.{b}"] = down, up
            if alpha is not None:
                state[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def expected_deltas(path: Path, fmt: str, scale: float, task: str) -> dict[str, torch.Tensor]:
    """our parameter name -> the delta the formula W += scale * alpha/rank * (B @ A) (or scale * diff) gives."""
    state = load_file(str(path))
    official = official_of(task)
    by_official = {v: k for k, v in official.items()}
    out: dict[str, torch.Tensor] = {}
    if fmt == "diff":
        for key, value in state.items():
            name = key[len("diffusion_model."):]
            if name.endswith(".diff_b"):
                target = by_official[name[: -len(".diff_b")] + ".bias"]
            elif name.endswith(".diff_m"):
                target = by_official[name[: -len(".diff_m")] + ".modulation"]
            elif name[: -len(".diff")] + ".weight" in by_official:
                target = by_official[name[: -len(".diff")] + ".weight"]
            else:
                target = by_official[name[: -len(".diff")]]
            out[target] = scale * value
        return out
    for module in LOWRANK_MODULES:
        off = official[module + ".weight"][: -len(".weight")]
        base = {"peft-official": f"diffusion_model.{off}", "peft-diffusers": f"transformer.{module}",
                "kohya": "lora_unet_" + off.replace(".", "_")}[fmt]
        a, b = ("lora_down", "lora_up") if fmt == "kohya" else ("lora_A", "lora_B")
        down, up = state[f"{base}.{a}.weight"], state[f"{base}.{b}.weight"]
        rank = down.shape[0]
        alpha = state[f"{base}.alpha"].item() if f"{base}.alpha" in state else rank
        product = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape((up.shape[0], *down.shape[1:]))
        out[module + ".weight"] = (scale * (alpha / rank)) * product
    return out


def merged_checkpoint(src: Path, dst: Path, task: str, expert_folders: dict[str, str],
                      deltas: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A copy of the official-layout checkpoint `src` whose DiT weights the test merged itself."""
    shutil.copytree(src, dst)
    official = official_of(task)
    for expert, folder in expert_folders.items():
        if expert not in deltas:
            continue
        todo = {official[t]: d for t, d in deltas[expert].items()}
        for file in sorted((dst / folder).glob("diffusion_pytorch_model*.safetensors")):
            state = load_file(str(file))
            for key in set(todo) & set(state):
                delta = todo.pop(key)
                state[key] = (state[key].float() + delta).to(state[key].dtype)
            save_file(state, str(file), metadata={"format": "pt"})
        assert not todo, f"keys not found in the checkpoint: {sorted(todo)[:3]}"
    return dst
