"""Pre-quantized files load as stored (ComfyUI fp8_scaled, ModelOpt FP8), and broken ones are refused
in one line before anything loads."""
from __future__ import annotations

import pytest
import torch
from quant_fixtures import make_comfy_fp8_scaled, make_modelopt_fp8, rewrite

from launcher.checkpoint import inspect_checkpoint
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.load import build_transformer_on_meta, load_module, transformer_source
from launcher.cli import main
from launcher.wan.quantize import QuantSpec, quantize_model
from launcher.wan.tasks import TASKS
from quant.linear import QuantLinear
from quant.source import quantizing

TASK = "t2v-A14B"


@pytest.fixture(scope="module")
def comfy(tiny_ckpt, tmp_path_factory):
    return make_comfy_fp8_scaled(tiny_ckpt(TASK), tmp_path_factory.mktemp("comfy") / "ckpt")


@pytest.fixture(scope="module")
def modelopt(tiny_ckpt, tmp_path_factory):
    return make_modelopt_fp8(tiny_ckpt(TASK, "diffusers"), tmp_path_factory.mktemp("modelopt") / "ckpt")


def _load(info, expert: str, spec: QuantSpec):
    model = build_transformer_on_meta(info, expert)
    targets, _ = quantize_model(model, spec, expert)
    load_module(model, quantizing(transformer_source(info, expert), targets), device="cpu")
    return model


@pytest.mark.parametrize("which, fmt, prefix", [("comfy", "comfyui-fp8-scaled", "model.diffusion_model."),
                                                ("modelopt", "modelopt-fp8", "")])
def test_prequantized_fp8_loads_as_stored(request, which, fmt, prefix):
    from safetensors import safe_open

    root = request.getfixturevalue(which)
    info = inspect_checkpoint(root, TASKS[TASK])
    assert {e: p.format for e, p in info.prequantized.items()} == {"high": fmt, "low": fmt}
    pre = info.prequantized["high"]
    assert len(pre.weights) == 10 * info.transformer_configs["high"]["num_layers"]
    model = _load(info, "high", QuantSpec.from_flags("fp8", ":", "1:", "both", ("high", "low")))
    path, stored_q = info.transformer_weights["high"].locations["blocks.1.attn1.to_q.weight"]
    _, stored_s = pre.scales.locations[pre.weights["blocks.1.attn1.to_q.weight"][1]]
    with safe_open(str(path), "pt") as f:
        q, s = f.get_tensor(stored_q), f.get_tensor(stored_s)
        w0 = f.get_tensor(info.transformer_weights["high"].locations["blocks.0.ffn.net.2.weight"][1])
        s0 = f.get_tensor(pre.scales.locations[pre.weights["blocks.0.ffn.net.2.weight"][1]][1])
    layer = model.blocks[1].attn1.to_q
    assert isinstance(layer, QuantLinear) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))  # bytes as stored, no re-rounding
    assert torch.equal(layer.weight_scale, s.float().expand(layer.out_features))
    # block 0 is left unquantized by the schedule: its fp8 weights come back dequantized
    plain = model.blocks[0].ffn.net[2]
    assert type(plain) is torch.nn.Linear and torch.equal(plain.weight, w0.float() * s0.float())


@pytest.mark.slow
def test_comfy_fp8_scaled_generates(comfy, tmp_path):
    from e2e_helpers import generate

    fp8 = generate(comfy, tmp_path / "fp8", TASK, "--quantize", "fp8")
    deq = generate(comfy, tmp_path / "deq", TASK)  # --quantize none: the fp8 weights dequantized
    a, b = fp8["_latents"], deq["_latents"]
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.1
    assert fp8["checkpoint"]["prequantized"] == {"high": "comfyui-fp8-scaled", "low": "comfyui-fp8-scaled"}


def _drop_one_scale(state):
    del state[next(k for k in state if k.endswith(".scale_weight"))]


def _bad_scale_shape(state):
    k = next(k for k in state if k.endswith(".scale_weight"))
    state[k] = torch.ones(3, 2)


def _orphan_scale(state):
    state["model.diffusion_model.blocks.0.self_attn.nothing.scale_weight"] = torch.tensor(1.0)


def _scale_on_float(state):
    k = next(k for k in state if k.endswith("norm_k.weight"))
    state[k[: -len(".weight")] + ".scale_weight"] = torch.tensor(1.0)


def _marker_without_scales(state):
    for k in [k for k in state if k.endswith((".scale_weight", ".scale_input"))]:
        del state[k]


@pytest.mark.parametrize("edit, words", [(_drop_one_scale, "without a scale"), (_bad_scale_shape, "has shape [3, 2]"),
                                         (_orphan_scale, "does not hold"), (_scale_on_float, "has a scale but"),
                                         (_marker_without_scales, "without any scale_weight")])
def test_broken_prequantized_files_refused_in_one_line(comfy, tmp_path, edit, words):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(comfy, broken)
    rewrite(broken / "low_noise_model", edit)
    with pytest.raises(CheckpointError) as err:
        inspect_checkpoint(broken, TASKS[TASK])
    message = str(err.value)
    assert words in message and "\n" not in message and "low_noise_model" in message


def test_broken_file_exits_2(comfy, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(comfy, broken)
    rewrite(broken / "high_noise_model", _bad_scale_shape)
    code = main(["generate", "--task", TASK, "--size", "64*64", "--frame_num", "5", "--ckpt_dir", str(broken),
                 "--prompt", "a cat", "--save_file", str(tmp_path / "v.mp4"), "--quantize", "fp8"])
    assert code == 2
    assert "has shape [3, 2]" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_command_writes_a_checkpoint_that_loads_equal(tiny_ckpt, tmp_path):
    import json

    from e2e_helpers import generate

    from launcher.outputs.atomic import sha256_of

    src = tiny_ckpt(TASK)
    out = tmp_path / "fp8"
    flags = ["--quantize", "fp8", "--quantize-blocks", "1:"]
    assert main(["quantize", "--task", TASK, "--ckpt_dir", str(src), "--out", str(out), *flags]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    assert (manifest["quantize"], manifest["blocks"], manifest["experts"]) == ("fp8", "1:", "both")
    assert manifest["source"]["files"] and all(sha256_of(src / rel) == h for rel, h in manifest["source"]["files"].items())
    assert all(sha256_of(out / rel) == h for rel, h in manifest["written"].items())
    info = inspect_checkpoint(out, TASKS[TASK])
    assert {e: p.format for e, p in info.prequantized.items()} == {"high": "per-channel-fp8", "low": "per-channel-fp8"}
    a = generate(out, tmp_path / "a", TASK, *flags)["_latents"]
    b = generate(src, tmp_path / "b", TASK, *flags)["_latents"]
    assert torch.equal(a, b)  # the stored bytes are what quantizing at load makes
    assert main(["quantize", "--task", TASK, "--ckpt_dir", str(src), "--out", str(out), *flags]) == 2  # not empty


def test_quantize_command_int8_ti2v(tiny_ckpt, tmp_path):
    out = tmp_path / "int8"
    assert main(["quantize", "--task", "ti2v-5B", "--ckpt_dir", str(tiny_ckpt("ti2v-5B")), "--out", str(out),
                 "--quantize", "int8"]) == 0
    info = inspect_checkpoint(out, TASKS["ti2v-5B"])
    assert info.prequantized["single"].format == "per-channel-int8"
    model = _load(info, "single", QuantSpec.from_flags("int8", ":", ":", "both", ("single",)))
    assert model.blocks[0].ffn.net[2].weight.dtype == torch.int8
