"""gpu_check's FP8/INT8 step: the 8-bit linears at A14B dimensions against bf16, and one block with --quantize.

Per linear shape of an A14B block (q/k/v/o: 5120 -> 5120, FFN up 5120 -> 13824, FFN down 13824 -> 5120)
at the 480P token count: ms, TFLOP/s and relative error against a float32 product (TF32 off) for bf16,
fp8 (`torch._scaled_mm`, sm89+) and int8 (`torch._int_mm`), the activation quantization included.
Then one real-dimension block (random weights) in bf16 autocast with its linears in fp8 and in int8:
ms per block and the error against the float32 block. Under --rehearse the same code runs on the
CPU at tiny sizes (proves the step, measures nothing about GPUs).

Registered in scripts/gpu_check.py as one step (`step_quant`); it imports this module lazily.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def step_quant(args: Any, *, device_of: Callable[[bool], Any], timed: Callable[..., tuple[float, Any]],
               rel: Callable[[Any, Any], float]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from launcher.wan.quantize import quantize_model
    from quant.linear import QuantLinear

    device = device_of(args.rehearse)
    torch.backends.cuda.matmul.allow_tf32 = False
    fp8_ok = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)
    modes = ["int8", *(["fp8"] if fp8_ok else [])]
    tokens = 64 if args.rehearse else 21 * 30 * 52
    dim, ffn = (64, 128) if args.rehearse else (5120, 13824)
    shapes = {"qkvo": (dim, dim), "ffn_up": (dim, ffn), "ffn_down": (ffn, dim)}
    out: dict[str, Any] = {"tokens": tokens, "dim": dim, "ffn": ffn,
                           "fp8": "ok" if fp8_ok else "no FP8 tensor cores (needs sm89+): skipped", "linears": {}}
    g = torch.Generator(device=device).manual_seed(0)
    for name, (k, n) in shapes.items():
        lin = torch.nn.Linear(k, n, device=device)
        x = torch.randn(tokens, k, generator=g, device=device)
        with torch.no_grad():
            ref = lin(x)
            flops = 2.0 * tokens * k * n
            bf16_lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
            bf16_lin.load_state_dict(lin.state_dict())
            xb = x.to(torch.bfloat16)
            secs, y = timed(lambda: bf16_lin(xb), device)
            row = {"bf16": {"ms": round(secs * 1e3, 3), "tflops": round(flops / secs / 1e12, 1), "rel": rel(y, ref)}}
            for mode in modes:
                q = QuantLinear.like(lin, mode).load_from(lin).to(device)
                secs, y = timed(lambda: q(xb), device)
                row[mode] = {"ms": round(secs * 1e3, 3), "tflops": round(flops / secs / 1e12, 1), "rel": rel(y, ref)}
        out["linears"][name] = row
        del lin, x, ref
    # one block: bf16 policy vs fp8 / int8 linears, against float32
    from diffusers import WanTransformer3DModel

    from launcher.wan.dit import WanDiT, rope_angles
    from launcher.wan.quantize import QuantSpec

    heads, head_dim = (4, 16) if args.rehearse else (40, 128)
    cfg = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, num_attention_heads=heads,
               attention_head_dim=head_dim, ffn_dim=ffn, num_layers=1, text_dim=64 if args.rehearse else 4096)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**cfg).eval().requires_grad_(False).to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grid = (2, 4, 6) if args.rehearse else (21, 30, 52)
    x = torch.randn(1, grid[0] * grid[1] * grid[2], dim, generator=g, device=device)
    context = torch.randn(1, 512, dim, generator=g, device=device) * 0.5
    tproj = torch.randn(1, 6, dim, generator=g, device=device) * 0.1
    rope = rope_angles(grid, head_dim, device=device)

    def run(m, amp: bool):
        blocks = WanDiT(m).blocks

        def go():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return blocks[0](x, context, tproj, rope).float()
        return go

    ref = run(model, False)()
    secs, y = timed(run(model, True), device)
    block = {"bf16": {"ms": round(secs * 1e3, 3), "rel_to_fp32": rel(y, ref)}}
    for mode in modes:
        qmodel = WanTransformer3DModel(**cfg).eval().requires_grad_(False)
        qmodel.load_state_dict(state)
        originals = {n: qmodel.get_submodule(n[: -len(".weight")]) for n in
                     quantize_model(WanTransformer3DModel(**cfg), QuantSpec(mode=mode), "single")[0]}
        for name, linear in originals.items():
            parent, _, child = name[: -len(".weight")].rpartition(".")
            setattr(qmodel.get_submodule(parent), child, QuantLinear.like(linear, mode).load_from(linear))
        qmodel.to(device)
        secs, y = timed(run(qmodel, True), device)
        block[mode] = {"ms": round(secs * 1e3, 3), "rel_to_fp32": rel(y, ref)}
    out["block"] = block
    out["ok"] = all(v["rel_to_fp32"] < 0.05 for v in block.values())
    return out
