"""The 8-bit linear layer: FP8 via torch._scaled_mm and INT8 via torch._int_mm on the CPU, the
row-local quantizer, the quantizing source and the Wan policy of which linears it replaces."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from parallel_jobs.tiny_blocks import DictRows

from launcher.wan.quantize import BLOCK_LINEARS, QuantSpec, QuantizeSpecError, quantize_model, step_switch
from quant.linear import QMAX, Precision, QuantLinear, dequantize_rows, quantize_rows
from quant.source import QuantizingSource


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode, bound", [("fp8", 0.06), ("int8", 0.02)])
def test_quantized_linear_close_to_float_and_equal_to_its_dequantized_reference(mode, bound):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g) * torch.linspace(0.01, 3, 40)[:, None])  # row scales differ
    x = torch.randn(3, 7, 96, generator=g)
    q = QuantLinear.like(lin, mode).load_from(lin)
    assert q.weight.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[mode]
    ref = lin(x)
    y = q(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert 1e-4 < _rel(y, ref) < bound  # really quantized, and close
    # the same product computed by hand: per-token activation rounding, per-row weight scale
    xs = x.reshape(-1, 96).abs().amax(1, keepdim=True) / QMAX[mode]
    xq = (x.reshape(-1, 96) / xs).clamp(-QMAX[mode], QMAX[mode])
    xq = xq.to(torch.float8_e4m3fn).float() if mode == "fp8" else xq.round()
    manual = (xq * xs) @ dequantize_rows(q.weight, q.weight_scale).t() + lin.bias
    assert _rel(y.reshape(-1, 40), manual) < 1e-6
    # high-precision steps: dequantized weight, unquantized activations
    q.precision.low = False
    hp = q(x)
    assert _rel(hp, x @ dequantize_rows(q.weight, q.weight_scale).t() + lin.bias) < 1e-6
    assert _rel(hp, ref) < _rel(y, ref)


def test_bf16_autocast_output_dtype():
    lin = nn.Linear(32, 16)
    q = QuantLinear.like(lin, "fp8").load_from(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(torch.randn(4, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_rows_quantize_independently(mode):
    w = torch.randn(10, 33)
    w[3] = 0  # an all-zero row gets scale 1, not a division by zero
    q, s = quantize_rows(w, mode)
    q2, s2 = quantize_rows(w[4:9], mode)
    assert torch.equal(q[4:9].view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s[4:9], s2)
    assert s[3] == 1 and not dequantize_rows(q, s)[3].any()


def test_quantizing_source_rows_equal_whole():
    base = DictRows({"l.weight": torch.randn(12, 8), "l.bias": torch.randn(12), "other": torch.randn(3)})
    src = QuantizingSource(base, {"l.weight": "int8"})
    assert set(src.keys()) == {"l.weight", "l.bias", "other", "l.weight_scale"} and src.shape("l.weight_scale") == (12,)
    whole, scale = src.get("l.weight"), src.get("l.weight_scale")
    assert torch.equal(src.get_slice("l.weight", 4, 8), whole[4:8])
    assert torch.equal(src.get_slice("l.weight_scale", 4, 8), scale[4:8])
    assert torch.equal(src.get("other"), base.state["other"])


def test_wan_policy_replaces_block_linears_only(tiny_ckpt):
    from launcher.checkpoint import inspect_checkpoint
    from launcher.checkpoint.load import build_transformer_on_meta
    from launcher.wan.tasks import TASKS

    info = inspect_checkpoint(tiny_ckpt("t2v-A14B"), TASKS["t2v-A14B"])
    spec = QuantSpec.from_flags("fp8", "1:-1", "1:", "high", ("high", "low"))
    model = build_transformer_on_meta(info, "high")
    n = len(model.blocks)
    targets, precision = quantize_model(model, spec, "high")
    assert sorted(targets) == sorted(f"blocks.{i}.{name}.weight" for i in range(1, n) for name in BLOCK_LINEARS)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {k[: -len(".weight")] for k in targets}
    assert not any(isinstance(m, QuantLinear) for m in model.blocks[0].modules())
    assert isinstance(model.proj_out, nn.Linear) and isinstance(model.condition_embedder.time_proj, nn.Linear)
    low = build_transformer_on_meta(info, "low")
    assert quantize_model(low, spec, "low") == ({}, None)
    switch = step_switch(spec, [precision])
    assert [(switch(i, 5), precision.low)[1] for i in range(5)] == [False, True, True, True, False]
    assert step_switch(QuantSpec.from_flags("int8", ":", ":", "both", ("single",)), [Precision()]) is None


@pytest.mark.parametrize("args", [("fp4", ":", ":", "both"), ("fp8", "2", ":", "both"), ("fp8", ":", "a:b", "both"),
                                  ("fp8", ":", ":", "mid"), ("fp8", ":", ":", "high")])
def test_bad_specs_refused(args):
    with pytest.raises(QuantizeSpecError):
        QuantSpec.from_flags(*args, task_experts=("single",))


@pytest.mark.slow
@pytest.mark.parametrize("mode, dtype", [("fp8", "torch.float8_e4m3fn")])  # fp8 is the one FSDP2 would cast
def test_fsdp_gathers_8bit_rows_as_stored(mode, dtype):
    from parallel_jobs.spawn import run_job

    run = run_job("job_quant_fsdp.py", 2, mode)
    assert run.ok, run.output[-4000:]
    for rank, res in run.by_rank().items():
        assert res["is_dtensor"] and res["local_rows"] == 40 and res["local_dtype"] == dtype
        assert res["seen_dtype"] == [dtype]  # unsharded for the forward, still 8-bit (not bf16)
        assert res["max_err"] < 1e-6, res
