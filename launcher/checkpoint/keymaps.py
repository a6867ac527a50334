"""Official Wan2.2 checkpoint key names -> diffusers / transformers key names.

Pure functions of the key list: no tensors are touched, so the same maps serve the meta-device
checks, the lazy tensor sources (which read one tensor per target key) and the tiny-checkpoint
maker (which inverts them). Every map is a bijection on the official key set; shapes are never
changed (see tests/reference/README.md: zero shape differences in every section).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

VaeVersion = Literal["2.1", "2.2"]

#: UMT5EncoderModel keys that alias another parameter (no official source; tied after loading).
T5_TIED_ALIASES: dict[str, str] = {"encoder.embed_tokens.weight": "shared.weight"}


class KeyMapError(ValueError):
    """An official key that no rule knows, or two official keys landing on one target."""


def _checked(mapping: dict[str, str], what: str) -> dict[str, str]:
    seen: dict[str, str] = {}
    for src, dst in mapping.items():
        if dst in seen:
            raise KeyMapError(f"{what}: keys {seen[dst]!r} and {src!r} both map to {dst!r}; "
                              "the checkpoint mixes formats")
        seen[dst] = src
    return mapping


def _rename_with(converter, keys: list[str], what: str) -> dict[str, str]:
    """Run a diffusers state-dict converter on `{key: key}`: it only renames, so values carry the source key."""
    converted = converter({k: k for k in keys})  # the converter pops from its argument: give it a fresh dict
    mapping = {src: dst for dst, src in converted.items()}
    for lost in (k for k in keys if k not in mapping):  # two sources renamed onto one target: name both
        dst = next(iter(converter({lost: lost})))
        raise KeyMapError(f"{what}: keys {converted[dst]!r} and {lost!r} both map to {dst!r}; "
                          "the checkpoint mixes formats")
    return mapping


def wan_transformer_key_map(official_keys: Iterable[str]) -> dict[str, str]:
    """Official `WanModel` key -> `WanTransformer3DModel` key, by diffusers' own single-file converter."""
    return _rename_with(convert_wan_transformer_to_diffusers, list(official_keys), "WanModel keys")


# Wan VAE residual block: Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d).
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}
_RESIDUAL_RE = re.compile(r"^(residual\.[0236]|shortcut)\.(.+)$")
_VAE22_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_VAE22_CODER = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_VAE22_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_VAE22_NESTED_RE = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)$")


def _residual(rest: str, key: str) -> str:
    m = _RESIDUAL_RE.match(rest)
    if m is None:
        raise KeyMapError(f"unknown Wan2.2 VAE residual key {key!r}; the file is not a Wan2.2 VAE")
    return f"{_RESIDUAL[m.group(1)]}.{m.group(2)}"


def _wan22_vae_key(key: str) -> str:
    head, _, rest = key.partition(".")
    if head in _VAE22_TOP:
        return f"{_VAE22_TOP[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        raise KeyMapError(f"unknown Wan2.2 VAE key {key!r}; the file is not a Wan2.2 VAE")
    for src, dst in _VAE22_CODER.items():
        if rest.startswith(src + "."):
            return f"{head}.{dst}.{rest[len(src) + 1:]}"
    if rest.startswith("middle."):
        _, idx, tail = rest.split(".", 2)
        block = _VAE22_MIDDLE.get(idx)
        if block is None:
            raise KeyMapError(f"unknown Wan2.2 VAE key {key!r}; the file is not a Wan2.2 VAE")
        return f"{head}.{block}.{tail if idx == '1' else _residual(tail, key)}"
    m = _VAE22_NESTED_RE.match(key)
    if m is None:
        raise KeyMapError(f"unknown Wan2.2 VAE key {key!r}; the file is not a Wan2.2 VAE")
    stack, i, j, tail = m.groups()
    blocks, sampler = ("down_blocks", "downsampler") if head == "encoder" else ("up_blocks", "upsampler")
    if tail.startswith(("resample.", "time_conv.")):  # the one resampling module closing each level
        return f"{head}.{blocks}.{i}.{sampler}.{tail}"
    return f"{head}.{blocks}.{i}.resnets.{j}.{_residual(tail, key)}"


def wan_vae_key_map(official_keys: Iterable[str], version: VaeVersion) -> dict[str, str]:
    """Official `WanVAE_` key -> `AutoencoderKLWan` key.

    2.1 uses diffusers' own converter; the wheel has none for the nested 2.2 layout, so that one is ours.
    """
    keys = list(official_keys)
    if version == "2.1":
        return _rename_with(convert_wan_vae_to_diffusers, keys, "Wan2.1 VAE keys")
    if version == "2.2":
        return _checked({k: _wan22_vae_key(k) for k in keys}, "Wan2.2 VAE keys")
    raise KeyMapError(f"unknown VAE version {version!r}; expected '2.1' or '2.2'")


_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # fc1 and gate have equal shapes, so a swap passes every shape check: official
    # `fc2(fc1(x) * gelu(gate(x)))` vs UMT5 `wo(act(wi_0(x)) * wi_1(x))` -> gate is wi_0, fc1 is wi_1.
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_T5_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _t5_key(key: str) -> str:
    if key in _T5_TOP:
        return _T5_TOP[key]
    m = _T5_BLOCK_RE.match(key)
    if m is None or m.group(2) not in _T5_BLOCK:
        raise KeyMapError(f"unknown umt5 encoder key {key!r}; the file is not the official umt5-xxl encoder")
    return f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"


def t5_key_map(official_keys: Iterable[str]) -> dict[str, str]:
    """Official `T5Encoder` (`models_t5_umt5-xxl-enc-bf16.pth`) key -> `UMT5EncoderModel` key."""
    return _checked({k: _t5_key(k) for k in official_keys}, "umt5 keys")


def invert(mapping: Mapping[str, str]) -> dict[str, str]:
    """Target key -> official key (the maps are bijections, `_checked` guarantees it)."""
    inverse = {dst: src for src, dst in mapping.items()}
    if len(inverse) != len(mapping):
        raise KeyMapError("key map is not one-to-one; cannot invert it")
    return inverse
