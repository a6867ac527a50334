"""Write a tiny random Wan2.2 checkpoint (official or diffusers layout) that every code path can load on CPU.

Tests, benchmarks and the demo import `make_tiny_checkpoint` from here; the command line is
`scripts/make_tiny_checkpoint.py`:

    python scripts/make_tiny_checkpoint.py --task t2v-A14B --layout official --out /tmp/tiny [--seed 0]
    python scripts/make_tiny_checkpoint.py --task ti2v-5B --layout official --out /tmp/bench --preset bench

The weights are made once as diffusers/transformers modules and written in either layout, so the same
seed gives the same weights in both (official names come from inverting `launcher.checkpoint.keymaps`). Official
key *names* at tiny dims are the real ones (tests/reference manifests) with fewer blocks: the Wan VAE
key names do not depend on its widths, and DiT/T5 names only on the block count. Every parameter gets
its own random values (norm weights included) so a swapped key changes the output.

`--preset bench` makes only the DiT bigger (T5 and VAE stay tiny): large enough that the block stack
dominates a CPU forward, which is what `scripts/bench_magcache.py` needs to measure MagCache's
wall-clock efficiency; still random, still small enough to write in seconds.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from launcher.checkpoint.keymaps import invert, t5_key_map, wan_transformer_key_map, wan_vae_key_map
from launcher.wan.tasks import TASKS, TaskSpec
from launcher.wan.vae import LATENT_STATS

#: the real checkpoints' key names (in the source tree, beside the tests that check the key maps)
REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "reference"
DIT_LAYERS, T5_LAYERS = 2, 2
T5_DIM = 32
TINY_DIT = {"num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 128, "num_layers": DIT_LAYERS,
            "freq_dim": 256, "text_dim": T5_DIM, "patch_size": [1, 2, 2], "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
#: DiT shapes per preset; "tiny" is the default every test uses (keep it byte-identical)
DIT_PRESETS = {
    "tiny": TINY_DIT,
    # head_dim 128 as in the real models; ffn 4x dim (5B: 14336/3072 = 4.7x); ~50M parameters
    "bench": {**TINY_DIT, "num_attention_heads": 4, "attention_head_dim": 128, "ffn_dim": 2048, "num_layers": 12},
}
TINY_T5 = {"d_model": T5_DIM, "d_kv": 8, "d_ff": 64, "num_heads": 4, "num_layers": T5_LAYERS,
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0}
TINY_VAE = {
    "2.1": {"base_dim": 8, "z_dim": 16},
    "2.2": {"base_dim": 8, "decoder_base_dim": 12, "z_dim": 48, "is_residual": True, "in_channels": 12,
            "out_channels": 12, "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16},
}
#: diffusers' convert script: flow_shift 3.0 for the A14B pipelines, 5.0 for ti2v (pipeline-level only)
DIFFUSERS_FLOW_SHIFT = {"t2v-A14B": 3.0, "i2v-A14B": 3.0, "ti2v-5B": 5.0}
WORDS = ("a the of and in on with to is cat dog video man woman car city street night day sky sea light "
         "walking running beautiful cinematic slow motion").split()


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(component.encode()))


def _randomize(model: torch.nn.Module, seed: int, component: str) -> None:
    """Distinct random values everywhere, scaled ~1/sqrt(fan_in) so a few blocks stay O(1)."""
    gen = _generator(seed, component)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                value = 0.02 * noise
            elif "norm" in name or leaf == "gamma":
                value = 1.0 + 0.1 * noise
            elif "scale_shift_table" in name:
                value = noise / p.shape[-1] ** 0.5
            elif p.ndim >= 2:
                value = noise / (p.numel() / p.shape[0]) ** 0.5
            else:
                value = 0.1 * noise
            p.copy_(value)


def make_tokenizer(words: Sequence[str] = WORDS) -> PreTrainedTokenizerFast:
    """A T5-like Unigram tokenizer built offline: <pad>=0, </s>=1, <unk>=2, byte fallback for any Unicode.

    `words` become whole-word pieces (scripts/train_tiny.py adds the tiny-shapes vocabulary)."""
    pieces = ["▁" + w for w in words] + ["▁"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -2.0 - 0.01 * i) for i, p in enumerate(pieces)]
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def make_models(task: TaskSpec, seed: int, preset: str = "tiny") -> dict[str, object]:
    """The random modules, in diffusers/transformers form: experts, text encoder (bf16), VAE, tokenizer.

    `preset` picks the DiT shape only (DIT_PRESETS); T5 and VAE are always the tiny ones.
    """
    tokenizer = make_tokenizer()
    experts = {}
    for expert in task.experts:
        dit = WanTransformer3DModel(**DIT_PRESETS[preset], in_channels=task.dit_in_channels, out_channels=task.z_dim)
        _randomize(dit, seed, f"dit-{task.name}-{expert}")
        experts[expert] = dit.eval()
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_T5))
    _randomize(t5, seed, "t5")
    t5 = t5.to(torch.bfloat16).eval()  # the official file is bf16 (`...-enc-bf16.pth`)
    mean, std = LATENT_STATS[task.vae_version]
    vae = AutoencoderKLWan(**TINY_VAE[task.vae_version], latents_mean=list(mean), latents_std=list(std))
    _randomize(vae, seed, f"vae-{task.vae_version}")
    return {"experts": experts, "text_encoder": t5, "vae": vae.eval(), "tokenizer": tokenizer}


def _reference_keys(name: str, max_blocks: int | None = None) -> list[str]:
    keys = json.loads((REFERENCE / name).read_text())["keys"]
    if max_blocks is None:
        return list(keys)
    return [k for k in keys if not (m := re.match(r"blocks\.(\d+)\.", k)) or int(m.group(1)) < max_blocks]


def _official_state(module: torch.nn.Module, official_keys: list[str], key_map) -> dict[str, torch.Tensor]:
    """Our module's tensors under official names; refuses unless the map covers the module exactly."""
    target_to_official = invert(key_map(official_keys))
    state = {k: v for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if set(state) != set(target_to_official):
        diff = sorted(set(state) ^ set(target_to_official))[:3]
        raise RuntimeError(f"tiny model keys and official key map differ, e.g. {diff}")
    return {target_to_official[k]: v.detach().contiguous().clone() for k, v in state.items()}


def _write_official(task: TaskSpec, parts: dict[str, object], out: Path) -> None:
    for expert, dit in parts["experts"].items():
        dit_keys = _reference_keys(f"official_wanmodel_{task.name}.json", dit.config.num_layers)
        folder = out / task.expert_folders[expert]
        folder.mkdir(parents=True, exist_ok=True)
        state = _official_state(dit, dit_keys, wan_transformer_key_map)
        if task.experts == ("single",):
            save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        else:  # sharded with an index, like the real A14B experts
            save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                  max_shard_size=sum(t.numel() * t.element_size() for t in state.values()) // 2)
        cfg = dit.config  # the keys WanModel.save_pretrained writes (text_dim, patch_size are not among them)
        config = {"_class_name": "WanModel", "_diffusers_version": diffusers.__version__,
                  "dim": cfg.num_attention_heads * cfg.attention_head_dim, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim,
                  "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "model_type": task.mode,
                  "num_heads": cfg.num_attention_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_channels,
                  "text_len": task.text_len}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    t5_keys = _reference_keys("official_t5_umt5_xxl_encoder.json", T5_LAYERS)
    torch.save(_official_state(parts["text_encoder"], t5_keys, t5_key_map), out / task.t5_checkpoint)
    vae_keys = _reference_keys(f"official_wan{task.vae_version.replace('.', '')}_vae.json")
    vae_state = _official_state(parts["vae"], vae_keys, lambda k: wan_vae_key_map(k, task.vae_version))
    torch.save(vae_state, out / task.vae_checkpoint)
    parts["tokenizer"].save_pretrained(out / task.t5_tokenizer)


def _write_diffusers(task: TaskSpec, parts: dict[str, object], out: Path) -> None:
    experts = parts["experts"]
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=DIFFUSERS_FLOW_SHIFT[task.name])
    common = {"tokenizer": parts["tokenizer"], "text_encoder": parts["text_encoder"], "vae": parts["vae"],
              "scheduler": scheduler}
    if task.experts == ("single",):
        pipe = WanPipeline(**common, transformer=experts["single"], expand_timesteps=True)
    elif task.mode == "i2v":
        pipe = WanImageToVideoPipeline(**common, transformer=experts["high"], transformer_2=experts["low"],
                                       boundary_ratio=task.boundary)
    else:
        pipe = WanPipeline(**common, transformer=experts["high"], transformer_2=experts["low"],
                           boundary_ratio=task.boundary)
    pipe.save_pretrained(out)


def make_tiny_checkpoint(task: str, layout: str, out: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a random `task` checkpoint in `layout` ('official' or 'diffusers') to `out` (new or empty)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if layout not in ("official", "diffusers"):
        raise ValueError(f"unknown layout {layout!r}; choose 'official' or 'diffusers'")
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    parts = make_models(TASKS[task], seed, preset)
    (_write_official if layout == "official" else _write_diffusers)(TASKS[task], parts, out)
    return out


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--layout", required=True, choices=("official", "diffusers"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny", choices=sorted(DIT_PRESETS),
                        help="DiT size: tiny (tests) or bench (blocks dominate a CPU forward)")
    args = parser.parse_args(argv)
    if not REFERENCE.is_dir():
        print(f"error: {REFERENCE} not found: tiny checkpoints take their key names from the source tree's "
              "tests/reference; run from a clone", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        out = make_tiny_checkpoint(args.task, args.layout, args.out, seed=args.seed, preset=args.preset)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.task} ({args.layout}, seed {args.seed}) -> {out}: "
          f"{checkpoint_bytes(out) / 1e6:.2f} MB in {time.perf_counter() - t0:.2f} s")
    return 0
