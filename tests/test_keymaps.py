"""Key maps against the real checkpoints' manifests: every official key lands on one real parameter.

Target models are built at the real dims on the meta device (no memory, no weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from launcher.checkpoint.keymaps import (
    T5_TIED_ALIASES,
    KeyMapError,
    invert,
    t5_key_map,
    wan_transformer_key_map,
    wan_vae_key_map,
)

REF = Path(__file__).parent / "reference"
MAPPINGS = json.loads((REF / "key_mappings.json").read_text())
SECTIONS = [s for s in MAPPINGS if s != "provenance"]


def _manifest(name: str) -> dict:
    return json.loads((REF / name).read_text())


def _key_map(section: str, keys: list[str]) -> dict[str, str]:
    if section.startswith("wanmodel_"):
        return wan_transformer_key_map(keys)
    if section == "vae_wan21":
        return wan_vae_key_map(keys, "2.1")
    if section == "vae_wan22":
        return wan_vae_key_map(keys, "2.2")
    assert section == "t5_umt5_xxl"
    return t5_key_map(keys)


def _meta_target(section: str, target: dict) -> torch.nn.Module:
    with torch.device("meta"):
        if section.startswith("wanmodel_"):
            return WanTransformer3DModel.from_config(target["full_config"])
        if section.startswith("vae_"):
            return AutoencoderKLWan.from_config(target["full_config"])
        return UMT5EncoderModel(UMT5Config(**target["config_used"]))


@pytest.mark.parametrize("section", SECTIONS)
def test_key_map_fills_the_real_model_exactly_once(section: str) -> None:
    official = _manifest(MAPPINGS[section]["official_file"])["keys"]
    target = _manifest(MAPPINGS[section]["target_file"])
    mapping = _key_map(section, list(official))

    assert mapping == MAPPINGS[section]["map"]  # entry by entry, against diffusers' own conversion
    assert set(mapping) == set(official)  # every official key consumed
    assert len(set(mapping.values())) == len(mapping)  # ... exactly once, onto distinct targets

    model_shapes = {k: tuple(v.shape) for k, v in _meta_target(section, target).state_dict().items()}
    for src, dst in mapping.items():
        assert dst in model_shapes, f"{src} -> {dst} is not a parameter of the target model"
        assert model_shapes[dst] == tuple(official[src]), f"{src} -> {dst}: shape differs"
    unfilled = set(model_shapes) - set(mapping.values())
    expected_unfilled = set(T5_TIED_ALIASES) if section == "t5_umt5_xxl" else set()
    assert unfilled == expected_unfilled


def test_t5_ffn_branches_are_not_swapped() -> None:
    # fc1 and gate share a shape, so only the names can catch a swap: gelu goes on wi_0.
    m = t5_key_map(["blocks.3.ffn.gate.0.weight", "blocks.3.ffn.fc1.weight"])
    assert m["blocks.3.ffn.gate.0.weight"].endswith("DenseReluDense.wi_0.weight")
    assert m["blocks.3.ffn.fc1.weight"].endswith("DenseReluDense.wi_1.weight")


def test_dit_cross_attention_norm_is_diffusers_norm2() -> None:
    m = wan_transformer_key_map(["blocks.0.norm3.weight", "head.modulation", "blocks.0.modulation"])
    assert m == {"blocks.0.norm3.weight": "blocks.0.norm2.weight", "head.modulation": "scale_shift_table",
                 "blocks.0.modulation": "blocks.0.scale_shift_table"}


@pytest.mark.parametrize("bad", ["blocks.0.ffn.gate.1.weight", "encoder.final_layer_norm.weight",
                                 "pos_embedding.weight"])
def test_unknown_t5_key_is_refused(bad: str) -> None:
    with pytest.raises(KeyMapError, match="umt5"):
        t5_key_map(["token_embedding.weight", bad])


def test_unknown_wan22_vae_key_is_refused() -> None:
    with pytest.raises(KeyMapError, match="Wan2.2 VAE"):
        wan_vae_key_map(["encoder.downsamples.0.residual.0.gamma"], "2.2")  # a flat 2.1 key


def test_two_sources_for_one_target_are_refused() -> None:
    # a file holding both the official name and the already-converted name of one tensor
    with pytest.raises(KeyMapError, match="both map to"):
        wan_transformer_key_map(["head.head.weight", "proj_out.weight"])


def test_invert_round_trips() -> None:
    keys = list(_manifest("official_wan22_vae.json")["keys"])
    forward = wan_vae_key_map(keys, "2.2")
    assert {v: k for k, v in invert(forward).items()} == forward
