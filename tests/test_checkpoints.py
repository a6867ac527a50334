"""Layout detection, validation errors (one line, naming the file) and loaders on tiny checkpoints."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.checkpoint import CheckpointError, detect_layout, inspect_checkpoint
from launcher.checkpoint.load import (
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
    t5_source,
    transformer_source,
    vae_source,
)
from launcher.wan.tasks import TASKS
from launcher.wan.text_encoder import encode_prompts
from launcher.wan.vae import decode

ALL_TASKS = list(TASKS)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _error(ckpt: Path, task: str) -> str:
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(ckpt, TASKS[task])
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_inspect_reports_layout_and_dims(tiny_ckpt, task: str, layout: str) -> None:
    spec = TASKS[task]
    info = inspect_checkpoint(tiny_ckpt(task, layout), spec)
    assert detect_layout(tiny_ckpt(task, layout)) == info.layout == layout
    assert set(info.transformer_configs) == set(spec.experts)
    assert (info.in_channels, info.out_channels, info.num_heads) == (spec.dit_in_channels, spec.z_dim, 4)
    assert info.vae_version == spec.vae_version
    assert info.t5_config["d_model"] == info.transformer_configs[spec.experts[0]]["text_dim"] == 32
    assert info.tokenizer_dir.is_dir()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_both_layouts_describe_the_same_models(tiny_ckpt, task: str) -> None:
    a = inspect_checkpoint(tiny_ckpt(task, "official"), TASKS[task])
    b = inspect_checkpoint(tiny_ckpt(task, "diffusers"), TASKS[task])
    assert a.transformer_configs == b.transformer_configs
    assert a.t5_config == b.t5_config
    assert a.vae_config == b.vae_config
    for expert in a.transformer_weights:
        assert a.transformer_weights[expert].shapes == b.transformer_weights[expert].shapes
    assert a.t5_weights.shapes == b.t5_weights.shapes and a.vae_weights.shapes == b.vae_weights.shapes


def test_official_a14b_experts_are_sharded_and_ti2v_is_one_file(tiny_ckpt) -> None:
    t2v = inspect_checkpoint(tiny_ckpt("t2v-A14B"), TASKS["t2v-A14B"])
    assert len(t2v.transformer_weights["high"].files) > 1
    assert t2v.transformer_weights["high"].files[0].parent.name == "high_noise_model"
    ti2v = inspect_checkpoint(tiny_ckpt("ti2v-5B"), TASKS["ti2v-5B"])
    assert [f.name for f in ti2v.transformer_weights["single"].files] == ["diffusion_pytorch_model.safetensors"]


# --- validation errors ------------------------------------------------------------------------

def test_missing_directory(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope", "t2v-A14B")


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    assert "model_index.json" in _error(tmp_path, "t2v-A14B")


@pytest.mark.parametrize("name", ["models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"])
def test_missing_file(tiny_ckpt, tmp_path: Path, name: str) -> None:
    ckpt = _copy(tiny_ckpt("t2v-A14B"), tmp_path)
    (ckpt / name).unlink()
    message = _error(ckpt, "t2v-A14B")
    assert name in message and "not found" in message


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("diffusion_pytorch_model-0000*.safetensors"))[0]


def test_truncated_shard(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("t2v-A14B"), tmp_path)
    shard = _first_shard(ckpt / "low_noise_model")
    shard.write_bytes(shard.read_bytes()[:-1000])
    message = _error(ckpt, "t2v-A14B")
    assert str(shard) in message and "truncated" in message


def test_garbage_single_file(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("ti2v-5B"), tmp_path)
    (ckpt / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    assert "diffusion_pytorch_model.safetensors" in _error(ckpt, "ti2v-5B")


def test_shard_listed_in_index_but_missing(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("i2v-A14B"), tmp_path)
    shard = _first_shard(ckpt / "high_noise_model")
    shard.unlink()
    message = _error(ckpt, "i2v-A14B")
    assert shard.name in message and "missing" in message


def test_tensor_shape_disagrees_with_config(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("t2v-A14B"), tmp_path)
    config = ckpt / "high_noise_model" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "ffn_dim": data["ffn_dim"] * 2}))
    message = _error(ckpt, "t2v-A14B")
    assert "blocks.0.ffn.0." in message and "shape" in message and "high_noise_model" in message


def test_tensor_missing_from_diffusers_file(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("ti2v-5B", "diffusers"), tmp_path)
    path = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["decoder.conv_out.bias"]
    save_file(state, path)
    message = _error(ckpt, "ti2v-5B")
    assert "decoder.conv_out.bias" in message and "missing" in message


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_runs_code_is_refused(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("t2v-A14B"), tmp_path)
    path = ckpt / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "evil": _RunsCode()}, path)
    message = _error(ckpt, "t2v-A14B")
    assert "Wan2.1_VAE.pth" in message and "weights_only" in message


def test_legacy_pth_without_zip_is_still_read(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt("t2v-A14B"), tmp_path)
    path = ckpt / "Wan2.1_VAE.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert inspect_checkpoint(ckpt, TASKS["t2v-A14B"]).vae_version == "2.1"


@pytest.mark.parametrize("layout, folder", [("official", "google/umt5-xxl"), ("diffusers", "tokenizer")])
def test_empty_or_missing_tokenizer_folder(tiny_ckpt, tmp_path: Path, layout: str, folder: str) -> None:
    ckpt = _copy(tiny_ckpt("t2v-A14B", layout), tmp_path)
    shutil.rmtree(ckpt / folder)
    (ckpt / folder).mkdir()
    assert "tokenizer" in _error(ckpt, "t2v-A14B")
    (ckpt / folder).rmdir()
    assert "not found" in _error(ckpt, "t2v-A14B")


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("have, want, expect", [
    ("i2v-A14B", "t2v-A14B", "in_channels is 36, but t2v-A14B expects 16; pass --task i2v-A14B"),
    ("t2v-A14B", "i2v-A14B", "in_channels is 16, but i2v-A14B expects 36; pass --task t2v-A14B"),
    ("ti2v-5B", "t2v-A14B", "needs two experts"),
    ("t2v-A14B", "ti2v-5B", "A14B checkpoint"),
])
def test_checkpoint_of_another_task(tiny_ckpt, layout: str, have: str, want: str, expect: str) -> None:
    assert expect in _error(tiny_ckpt(have, layout), want)


# --- sources and loaders ----------------------------------------------------------------------

def test_sources_read_rows_lazily_under_target_names(tiny_ckpt) -> None:
    official = inspect_checkpoint(tiny_ckpt("t2v-A14B"), TASKS["t2v-A14B"])
    diffusers = inspect_checkpoint(tiny_ckpt("t2v-A14B", "diffusers"), TASKS["t2v-A14B"])
    for source_of in (lambda i: transformer_source(i, "low"), t5_source, vae_source):
        with source_of(official) as a, source_of(diffusers) as b:
            assert set(a.keys()) == set(b.keys())
            keys = [k for k in a.keys() if len(a.shape(k)) > 1 and a.shape(k)[0] >= 3][:5]
            assert len(keys) == 5
            for key in keys:
                full = a.get(key)
                assert tuple(full.shape) == a.shape(key) and torch.equal(full, b.get(key))
                assert torch.equal(a.get_slice(key, 1, 3), full[1:3])
    with transformer_source(official, "high") as source, pytest.raises(IndexError):
        source.get_slice("proj_out.weight", 0, 10_000)


def _dit_outputs(info, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, info.in_channels, 3, 4, 4, generator=g, dtype=dtype)
    ctx = torch.randn(1, 512, info.t5_config["d_model"], generator=g, dtype=dtype)
    out = {}
    for expert in info.transformer_configs:
        model = load_transformer(info, expert, dtype=dtype, device="cpu")
        out[expert] = model(hidden_states=x, timestep=torch.tensor([700]), encoder_hidden_states=ctx,
                            return_dict=False)[0]
    return out


@pytest.mark.parametrize("task", ALL_TASKS)
def test_both_layouts_load_identical_models(tiny_ckpt, task: str) -> None:
    infos = [inspect_checkpoint(tiny_ckpt(task, layout), TASKS[task]) for layout in ("official", "diffusers")]
    dits = [_dit_outputs(info) for info in infos]
    assert dits[0].keys() == dits[1].keys()
    for expert in dits[0]:
        assert torch.equal(dits[0][expert], dits[1][expert])
        assert dits[0][expert].abs().max() < 20  # sane activations after the blocks
    if len(dits[0]) == 2:
        assert not torch.equal(dits[0]["high"], dits[0]["low"])  # the experts are different models
    texts = [TASKS[task].sample_neg_prompt, "a cat walking"]
    ctxs = [encode_prompts(load_tokenizer(i), load_text_encoder(i, dtype=torch.float32, device="cpu"), texts,
                           device="cpu") for i in infos]
    assert all(torch.equal(a, b) for a, b in zip(*ctxs))
    latent = torch.randn(TASKS[task].z_dim, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    videos = [decode(load_vae(i, device="cpu")[0], latent) for i in infos]
    assert torch.equal(videos[0], videos[1])


def test_bf16_load_rounds_every_weight_as_official(tiny_ckpt, tmp_path: Path) -> None:
    """--convert_model_dtype is official's `model.to(param_dtype)`: modulation, norms and time
    embedding too (diffusers' `_keep_in_fp32_modules` would keep those float32; issue 12)."""
    ckpt = _copy(tiny_ckpt("ti2v-5B"), tmp_path)
    path = ckpt / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    info = inspect_checkpoint(ckpt, TASKS["ti2v-5B"])
    model = load_transformer(info, "single", dtype=torch.bfloat16, device="cpu")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {k: v for k, v in dtypes.items() if v != torch.bfloat16}
    assert model.rope.freqs_cos.device.type == "cpu"  # buffers were built, not left on meta
    fp32 = load_transformer(inspect_checkpoint(tiny_ckpt("ti2v-5B"), TASKS["ti2v-5B"]), "single",
                            dtype=torch.float32, device="cpu")
    assert torch.equal(model.proj_out.weight.float(), fp32.proj_out.weight.to(torch.bfloat16).float())


def test_text_encoder_is_tied_and_in_the_requested_dtype(tiny_ckpt) -> None:
    info = inspect_checkpoint(tiny_ckpt("t2v-A14B", "diffusers"), TASKS["t2v-A14B"])
    model = load_text_encoder(info, dtype=torch.bfloat16, device="cpu")
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # wo too, like the official bf16 T5
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
