"""The planner prices --quantize (a model, not a measurement): 8-bit block linears halve the DiT's
memory and FSDP all-gathers; t2v-A14B 832*480 x 33 frames with fp8, --t5_cpu and --offload_model True
fits a 24 GB GPU where the unquantized (float32) experts do not. At 81 frames it does not fit: the
denoise activations (the float64 RoPE peak, ~9.7 GB, counted by the dry run) need more than the
24 GB left after the 8-bit expert."""
from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.planner.perf_model import DIMS


def _plan(capsys, *flags: str) -> dict:
    assert main(["plan", "--task", "t2v-A14B", "--prompt", "x", "--ckpt_dir", "/tmp", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size, frames, quant, fits", [("832*480", 33, "fp8", True), ("832*480", 33, "none", False),
                                                       ("832*480", 81, "fp8", False), ("1280*720", 81, "fp8", False)])
def test_one_24gb_gpu(capsys, size, frames, quant, fits):
    out = _plan(capsys, "--size", size, "--frame_num", str(frames), "--gpus", "1", "--gpu", "4090", "--quantize",
                quant, "--t5_cpu", "--offload_model", "True")
    (lay,) = out["layouts"]
    assert lay["fits"] is fits and lay["memory_gb"]["t5"] == 0 and lay["offload"]
    assert out["model"]["quantize"] == quant and out["model"]["gemm_factor"] == (2.0 if quant == "fp8" else 1.0)


def test_fp8_halves_block_bytes_and_gathers(capsys):
    dims = DIMS["t2v-A14B"]
    assert dims.block_bytes("fp8") == dims.block_bytes("none") / 2
    assert 0.5 < dims.expert_bytes("fp8") / dims.expert_bytes("none") < 0.52
    gathers = {}
    for q in ("none", "int8"):
        out = _plan(capsys, "--size", "1280*720", "--gpus", "8", "--gpu", "h100", "--quantize", q)
        lay = next(x for x in out["layouts"] if x["ulysses"] == 8 and x["dit_fsdp"])
        gathers[q] = lay["comm_per_step_gb"]["fsdp_all_gather"]
    assert gathers["int8"] == pytest.approx(gathers["none"] / 2, rel=0.02)


def test_fp8_on_a100_refused(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--prompt", "x", "--ckpt_dir", "/tmp", "--gpus", "1", "--gpu", "a100",
                 "--quantize", "fp8"]) == 2
    assert "no FP8 tensor cores" in capsys.readouterr().err
