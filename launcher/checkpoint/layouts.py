"""The two on-disk layouts -> one description (configs + where each target tensor lives).

Official (Wan-Video/Wan2.2 release): `high_noise_model/`, `low_noise_model/` (A14B) or the root
(ti2v-5B) hold a WanModel `config.json` + safetensors; `models_t5_umt5-xxl-enc-bf16.pth`,
`Wan2.x_VAE.pth`, `google/umt5-xxl/`. Dims missing from the configs come from tensor shapes
(docs/pipeline_facts.md #35). Diffusers (`*-Diffusers` repos): `model_index.json` and component folders.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config

from launcher.checkpoint.files import (
    CheckpointError,
    StoredTensors,
    check_tokenizer_dir,
    mapped,
    read_json,
    read_pth,
    read_safetensors,
    require_dir,
    weight_files,
)
from launcher.checkpoint.quantized import SINGLE_FILE_PREFIX, Prequantized, split_prequantized
from launcher.checkpoint.keymaps import T5_TIED_ALIASES, t5_key_map, wan_transformer_key_map, wan_vae_key_map
from launcher.wan.tasks import TaskSpec
from launcher.checkpoint.sources import WeightFiles
from launcher.wan.vae import LATENT_STATS

#: diffusers' WanPipeline: `transformer` runs for t >= boundary (high noise), `transformer_2` below it.
DIFFUSERS_EXPERT_FOLDERS: dict[str, str] = {"high": "transformer", "low": "transformer_2", "single": "transformer"}

#: the UMT5Config fields we carry, whatever the layout (same keys, so both layouts compare equal);
#: dropout_rate is always 0.0: inference only, and a stored 0.1 would make equal models look different
T5_CONFIG_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "feed_forward_proj", "layer_norm_epsilon",
                  "pad_token_id", "eos_token_id", "decoder_start_token_id")

Parts = dict[str, Any]


def _shapes(stored: StoredTensors) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (_, shape) in stored.items()}


def _init_defaults(cls: type) -> dict[str, Any]:
    """`__init__` defaults, so configs from both layouts carry the same full key set."""
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def official_dit_config(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """WanModel config.json + tensor shapes -> `WanTransformer3DModel` kwargs.

    config.json omits text_dim and patch_size (`ignore_for_config`), so they come from the tensors.
    """
    try:
        dim, heads = int(config["dim"]), int(config["num_heads"])
        config = {
            "patch_size": list(shapes["patch_embedding.weight"][2:]), "num_attention_heads": heads,
            "attention_head_dim": dim // heads, "in_channels": int(config["in_dim"]),
            "out_channels": int(config["out_dim"]), "text_dim": shapes["text_embedding.0.weight"][1],
            "freq_dim": int(config["freq_dim"]), "ffn_dim": int(config["ffn_dim"]),
            "num_layers": int(config["num_layers"]), "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
            "eps": float(config["eps"]), "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        }
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: WanModel config or tensors lack or garble {e.args[0]!r}; "
                              "re-download the checkpoint") from None
    if heads <= 0 or dim % heads:
        raise CheckpointError(f"{path}: dim {dim} is not a multiple of num_heads {heads}; the config is corrupt")
    return {**_init_defaults(WanTransformer3DModel), **config}


def official_t5_config(shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """umt5 dims from the `.pth` tensor shapes (the official loader hard-codes xxl; docs/pipeline_facts.md #33, #35)."""
    try:
        vocab, dim = shapes["token_embedding.weight"]
        num_buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        dim_attn = shapes["blocks.0.attn.q.weight"][0]
        dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: not an umt5 encoder state dict; re-download {path.name}") from None
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    return {
        "vocab_size": vocab, "d_model": dim, "d_kv": dim_attn // heads, "d_ff": dim_ffn, "num_layers": layers,
        "num_heads": heads, "relative_attention_num_buckets": num_buckets, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }


def official_vae_config(shapes: Mapping[str, tuple[int, ...]], version: str, path: Path) -> dict[str, Any]:
    """`AutoencoderKLWan` kwargs from the `.pth` tensor shapes (docs/pipeline_facts.md #32, #35)."""
    try:
        base_dim = shapes["encoder.conv1.weight"][0]
        z_dim = shapes["conv2.weight"][0]
        dec_dim = shapes["decoder.head.2.weight"][1]
    except KeyError:
        raise CheckpointError(f"{path}: not a Wan VAE state dict; re-download {path.name}") from None
    mean, std = LATENT_STATS[version]
    if z_dim != len(mean):
        raise CheckpointError(f"{path}: latent width {z_dim}, but a Wan{version} VAE has {len(mean)}; "
                              "the file is another VAE, re-download it")
    config: dict[str, Any] = {
        "base_dim": base_dim, "z_dim": z_dim, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
        "temperal_downsample": [False, True, True], "dropout": 0.0,
        "latents_mean": list(mean), "latents_std": list(std),
    }
    if version == "2.2":
        config.update(decoder_base_dim=dec_dim, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                   scale_factor_temporal=4, scale_factor_spatial=16)
    return {**_init_defaults(AutoencoderKLWan), **config}


def _official_expert_dirs(root: Path, task: TaskSpec) -> dict[str, Path]:
    two = (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir()
    if task.experts == ("single",):
        if two:
            raise CheckpointError(f"{root}: holds high_noise_model/ and low_noise_model/ (an A14B checkpoint), but "
                                  f"{task.name} has one model in the root; pass --task t2v-A14B or --task i2v-A14B")
        return {"single": root}
    if not two:
        raise CheckpointError(f"{root}: holds one model in the root (a ti2v-5B checkpoint), but {task.name} needs two "
                              "experts in high_noise_model/ and low_noise_model/; pass --task ti2v-5B")
    return {e: require_dir(root / task.expert_folders[e], f"{e}-noise expert folder",
                           "download the complete checkpoint or fix --ckpt_dir") for e in task.experts}


def _official_dit(folder: Path) -> tuple[dict[str, Any], WeightFiles]:
    config_path = folder / "config.json"
    config = read_json(config_path)
    if config.get("_class_name") != "WanModel":
        raise CheckpointError(f"{config_path}: _class_name is {config.get('_class_name')!r}, expected 'WanModel'; "
                              "point --ckpt_dir at an official Wan2.2 checkpoint")
    stored = read_safetensors(folder, "diffusion_pytorch_model")
    # ComfyUI single files name the tensors under `model.diffusion_model.` (the key map drops it too)
    shapes = {k.removeprefix(SINGLE_FILE_PREFIX): shape for k, shape in _shapes(stored).items()}
    dit_config = official_dit_config(config, shapes, config_path)
    key_map = mapped(wan_transformer_key_map, list(stored), folder)
    return dit_config, weight_files("safetensors", stored, key_map, folder)


def _split(weights: dict[str, WeightFiles], layout: str) -> tuple[dict[str, WeightFiles], dict[str, Prequantized]]:
    """Each expert's model tensors, and what is pre-quantized (FP8/INT8 files; launcher.checkpoint.quantized)."""
    plain, pre = {}, {}
    for expert, w in weights.items():
        plain[expert], found = split_prequantized(w, w.files[0].parent, layout)
        if found is not None:
            pre[expert] = found
    return plain, pre


def inspect_official(root: Path, task: TaskSpec) -> Parts:
    """Configs and weight locations of an official-layout checkpoint."""
    dits = {e: _official_dit(d) for e, d in _official_expert_dirs(root, task).items()}
    dit_weights, prequantized = _split({e: w for e, (_, w) in dits.items()}, "official")
    t5_path = root / task.t5_checkpoint
    t5 = read_pth(t5_path)
    vae_path = root / task.vae_checkpoint
    vae = read_pth(vae_path)
    return {
        "transformer_configs": {e: config for e, (config, _) in dits.items()},
        "transformer_weights": dit_weights,
        "prequantized": prequantized,
        "t5_config": official_t5_config(_shapes(t5), t5_path),
        "t5_weights": weight_files("pth", t5, mapped(t5_key_map, list(t5), t5_path), t5_path),
        "vae_version": task.vae_version,
        "vae_config": official_vae_config(_shapes(vae), task.vae_version, vae_path),
        "vae_weights": weight_files(
            "pth", vae, mapped(lambda k: wan_vae_key_map(k, task.vae_version), list(vae), vae_path), vae_path),
        "tokenizer_dir": check_tokenizer_dir(root / task.t5_tokenizer),
    }


def _diffusers_config(folder: Path, cls: type) -> dict[str, Any]:
    """A diffusers component config.json with `__init__` defaults filled in (old files omit newer fields)."""
    config = read_json(folder / "config.json")
    if config.get("_class_name") not in (None, cls.__name__):
        raise CheckpointError(f"{folder / 'config.json'}: _class_name is {config['_class_name']!r}, expected "
                              f"{cls.__name__!r}; point --ckpt_dir at a Wan2.2 diffusers checkpoint")
    known = _init_defaults(cls)
    return {**known, **{k: v for k, v in config.items() if k in known}}


def _present(index: Mapping[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def inspect_diffusers(root: Path, task: TaskSpec) -> Parts:
    """Configs and weight locations of a diffusers-layout checkpoint (`transformer/` = high-noise expert)."""
    index_path = root / "model_index.json"
    index = read_json(index_path)
    two = _present(index, "transformer_2")
    if task.experts == ("single",) and two:
        raise CheckpointError(f"{index_path}: lists transformer_2 (two experts, an A14B checkpoint), but {task.name} "
                              "has one model; pass --task t2v-A14B or --task i2v-A14B")
    if task.experts != ("single",) and not two:
        raise CheckpointError(f"{index_path}: has no transformer_2 (one model, a ti2v-5B checkpoint), but {task.name} "
                              "needs two experts; pass --task ti2v-5B")
    configs, weights = {}, {}
    for expert in task.experts:
        folder = require_dir(root / DIFFUSERS_EXPERT_FOLDERS[expert], f"{expert}-noise transformer folder",
                             "download the complete checkpoint or fix --ckpt_dir")
        configs[expert] = _diffusers_config(folder, WanTransformer3DModel)
        weights[expert] = weight_files("safetensors", read_safetensors(folder, "diffusion_pytorch_model"), None, folder)

    t5_dir = require_dir(root / "text_encoder", "text_encoder folder", "download the complete checkpoint")
    t5_cfg = UMT5Config.from_dict(read_json(t5_dir / "config.json"))
    t5 = {k: v for k, v in read_safetensors(t5_dir, "model").items() if k not in T5_TIED_ALIASES}

    vae_dir = require_dir(root / "vae", "vae folder", "download the complete checkpoint")
    vae_cfg = _diffusers_config(vae_dir, AutoencoderKLWan)
    versions = [v for v, (mean, _) in LATENT_STATS.items() if len(mean) == vae_cfg["z_dim"]]
    if not versions:
        raise CheckpointError(f"{vae_dir / 'config.json'}: z_dim {vae_cfg['z_dim']} is neither the Wan2.1 (16) nor "
                              "the Wan2.2 (48) VAE; re-download the checkpoint")
    weights, prequantized = _split(weights, "diffusers")
    return {
        "transformer_configs": configs,
        "transformer_weights": weights,
        "prequantized": prequantized,
        "t5_config": {**{k: getattr(t5_cfg, k) for k in T5_CONFIG_KEYS}, "dropout_rate": 0.0},
        "t5_weights": weight_files("safetensors", t5, None, t5_dir),
        "vae_version": versions[0],
        "vae_config": vae_cfg,
        "vae_weights": weight_files("safetensors", read_safetensors(vae_dir, "diffusion_pytorch_model"), None, vae_dir),
        "tokenizer_dir": check_tokenizer_dir(root / "tokenizer"),
    }
