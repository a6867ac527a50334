#!/usr/bin/env python
"""FP8 / INT8 accuracy on the CPU, measured (speed on a CPU is not a claim; gpu_check times a GPU).

1. `blocks`: one forward of real-dimension Wan2.2 A14B blocks (dim 5120, FFN 13824, 40 heads, random
   weights, a few blocks, a modest token count) under four policies: float32, bf16 autocast (the
   official GPU policy), and bf16 with the attention projections and FFN in fp8 / int8. Prints each
   one's relative L2 error against float32 and against the bf16 policy.
2. `videos`: the tiny t2v checkpoint in bf16, one video per quantization schedule, each measured
   against the unquantized bf16 video with `magcache-launch compare` (PSNR / SSIM).

Writes benchmarks/results/quant-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULES = {
    "fp8": ["--quantize", "fp8"],
    "fp8, steps 2:-2": ["--quantize", "fp8", "--quantize-steps", "2:-2"],
    "fp8, blocks 1:": ["--quantize", "fp8", "--quantize-blocks", "1:"],
    "fp8, high expert": ["--quantize", "fp8", "--quantize-experts", "high"],
    "fp8, low expert": ["--quantize", "fp8", "--quantize-experts", "low"],
    "int8": ["--quantize", "int8"],
    "int8, steps 2:-2": ["--quantize", "int8", "--quantize-steps", "2:-2"],
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_blocks(blocks: int, frames: int, side: int, text: int) -> dict:
    from diffusers import WanTransformer3DModel

    from launcher.wan.dit import WanDiT
    from launcher.wan.quantize import BLOCK_LINEARS
    from magcache.controller import ComputeAll
    from quant.linear import QuantLinear

    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=blocks,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    model = WanTransformer3DModel(**config).eval().requires_grad_(False)
    with torch.no_grad():  # diffusers zero-inits some tables; give every parameter a scale-aware random value
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    dit = WanDiT(model)
    latent = torch.randn(16, frames, side, side)
    context = dit.embed_text(torch.randn(1, text, 4096))
    t = torch.tensor([700.0])
    tokens = frames * (side // 2) ** 2

    def forward(autocast: bool) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = dit.forward(latent, t, context, runner=ComputeAll(), index=0)
        return out, time.perf_counter() - start

    ref, t32 = forward(False)
    bf16, t16 = forward(True)
    rows = {"float32": {"rel_vs_float32": 0.0, "seconds": t32},
            "bf16": {"rel_vs_float32": _rel(bf16, ref), "rel_vs_bf16": 0.0, "seconds": t16}}
    originals = {f"{i}.{n}": model.blocks[i].get_submodule(n) for i in range(blocks) for n in BLOCK_LINEARS}
    for mode in ("fp8", "int8"):
        for key, linear in originals.items():
            i, name = key.split(".", 1)
            parent, _, child = name.rpartition(".")
            setattr(model.blocks[int(i)].get_submodule(parent), child, QuantLinear.like(linear, mode).load_from(linear))
        out, secs = forward(True)
        rows[mode] = {"rel_vs_float32": _rel(out, ref), "rel_vs_bf16": _rel(out, bf16), "seconds": secs}
    for row in rows.values():
        row["seconds"] = round(row["seconds"], 2)
    return {"dims": {"dim": 5120, "ffn": 13824, "heads": 40, "blocks": blocks, "tokens": tokens, "text_tokens": text},
            "note": "random weights (normal, std 1/sqrt(fan_in)); output of the whole forward (blocks + head)",
            "policies": rows}


def bench_videos(size: str, frames: int, steps: int, done: dict) -> dict:
    spec = __import__("importlib.util").util.spec_from_file_location("mk", ROOT / "scripts" / "make_tiny_checkpoint.py")
    mk = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out: dict = {"task": "t2v-A14B", "size": size, "frames": frames, "steps": steps, "dtype": "bfloat16", "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = mk.make_tiny_checkpoint("t2v-A14B", "official", Path(tmp) / "ckpt", seed=0)

        def run(name: str, extra: list[str]) -> Path:
            video = Path(tmp) / f"{name.replace(' ', '_').replace(',', '').replace(':', '_')}.mp4"
            cmd = [sys.executable, "-m", "launcher", "generate", "--task", "t2v-A14B", "--size", size, "--frame_num",
                   str(frames), "--ckpt_dir", str(ckpt), "--prompt", "a red car drives through a snowy city at night",
                   "--base_seed", "7", "--sample_steps", str(steps), "--dtype", "bfloat16", "--save_file", str(video),
                   *extra]
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
            return video

        base = run("bf16", [])
        for name, flags in SCHEDULES.items():
            if name in done.get("rows", {}) and all(done.get(k) == out[k] for k in ("size", "frames", "steps")):
                out["rows"][name] = done["rows"][name]  # measured by an earlier run with the same settings
                continue
            video = run(name, flags)
            res = subprocess.run([sys.executable, "-m", "launcher", "compare", str(base), str(video), "--json"],
                                 check=True, capture_output=True, text=True, env=env, cwd=ROOT)
            m = json.loads(res.stdout)
            mean = m["mean"]
            psnr = None if mean["psnr"] is None else round(mean["psnr"], 2)  # None: identical videos
            out["rows"][name] = {"flags": " ".join(flags), "psnr_db": psnr, "ssim_luma": round(mean["ssim_luma"], 4)}
            print(f"{name:22s} PSNR {psnr} dB  SSIM {mean['ssim_luma']:.4f}", flush=True)
    return out


def render_videos(videos: dict, markdown: Path) -> None:
    """The table of BENCHMARKS.md's quant-videos section from the measured rows."""
    from benchmarks.common import markdown_table, replace_section

    rows = [(name, f"`{row['flags']}`", "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.2f}",
             f"{row['ssim_luma']:.4f}") for name, row in videos["rows"].items()]
    replace_section(markdown, "quant-videos", markdown_table(["schedule", "flags", "PSNR dB", "SSIM"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["blocks", "videos", "both"], default="both")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--frames", type=int, default=1, help="latent frames of the block benchmark")
    ap.add_argument("--side", type=int, default=32, help="latent side of the block benchmark (tokens = side^2/4)")
    ap.add_argument("--size", default="256*256")
    ap.add_argument("--video-frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant-cpu.json")
    args = ap.parse_args()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["torch"] = torch.__version__
    if args.part in ("blocks", "both"):
        result["blocks"] = bench_blocks(args.blocks, args.frames, args.side, 64)
        for name, row in result["blocks"]["policies"].items():
            print(f"{name:8s} rel vs float32 {row['rel_vs_float32']:.2e}  rel vs bf16 {row.get('rel_vs_bf16', 0):.2e}",
                  flush=True)
    if args.part in ("videos", "both"):
        result["videos"] = bench_videos(args.size, args.video_frames, args.steps, result.get("videos", {}))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "videos" in result:
        render_videos(result["videos"], ROOT / "BENCHMARKS.md")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
