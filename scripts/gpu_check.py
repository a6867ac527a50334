#!/usr/bin/env python
"""The prepared GPU proof: one command, one GPU, at most ~8 minutes, every step under its own timeout.

    python scripts/gpu_check.py                 # on a CUDA machine: writes benchmarks/results/gpu-<device>.json
                                                # and the "GPU check" section of BENCHMARKS.md
    python scripts/gpu_check.py --rehearse      # on CPU, every step at tiny size (CI runs this): proves
                                                # the script itself, measures nothing about GPUs
    python scripts/gpu_check.py --render-only   # BENCHMARKS.md from the stored gpu-*.json

Steps (each a child process of this script, killed at its timeout; one failing step does not stop
the others, and the JSON records each step's status, seconds and figures or error):

- S0 versions, device, flash-attn, NCCL;
- S1 the noise our CUDA generator draws equals official's draw (`torch.Generator(device)`);
- S2 CUDA vs CPU float32 on a tiny checkpoint with TF32 off: one DiT forward and 3 CFG steps
  of each task, relative difference <= 1e-5;
- S3 CLI runs on the tiny checkpoints: the three tasks in the default dtype, and t2v with
  `--offload_model True`, `--convert_model_dtype`, `--compile`: exit 0, finite latents, and
  MagCache's skipped forwards equal `plan --json`'s;
- S4 real A14B block dimensions (dim 5120, 40 heads, FFN 13824; 2 blocks, random weights) at the
  480P and 720P token counts: our blocks vs diffusers' blocks (ms per block, TFLOP/s), the bf16
  error of each against a float32 copy, eager vs `--compile`;
- S5 one-rank NCCL + gloo groups, a 2-D mesh (`split_group` on the mixed parent) with its gloo
  twin, and an FSDP2-loaded model equal to a plainly loaded one;
- S6 Wan2.2 VAE decode peak memory at 1280*704 (random weights, real config), and what that means
  next to the ti2v-5B DiT on a 24 GB card with and without `--offload_model`;
- S7 FP8 (sm89+) and INT8 linears at A14B dims against bf16 (ms, TFLOP/s, error against float32)
  and one block with `--quantize fp8` / `int8` (benchmarks/gpu_quant.py).

Under `--rehearse` the same code runs on the CPU with tiny sizes: figures are recorded as a
rehearsal and never rendered as GPU figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    markdown_table,
    now_utc,
    result_record,
    replace_section,
    write_result,
)

MARKDOWN = ROOT / "BENCHMARKS.md"
SECTION = "gpu-check"
STEP_PREFIX = "GPUCHECK "
#: seconds per step on a GPU (the whole run stays under ~8 minutes); rehearsal gets its own budget
TIMEOUTS = {"S0": 60, "S1": 30, "S2": 90, "S3": 200, "S4": 200, "S5": 60, "S6": 90, "S7": 120}
REHEARSAL_TIMEOUTS = {"S0": 60, "S1": 60, "S2": 240, "S3": 900, "S4": 300, "S5": 120, "S6": 120, "S7": 120}
TASK_FOLDERS = {"t2v-A14B": ("high_noise_model", "low_noise_model"), "i2v-A14B": ("high_noise_model", "low_noise_model"),
                "ti2v-5B": (".",)}


# ----------------------------------------------------------------------------------------- helpers
def _torch():
    import torch

    return torch


def _device(rehearse: bool):
    torch = _torch()
    if rehearse:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --rehearse on a CPU machine")
    return torch.device("cuda", 0)


def _sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device, repeat: int = 3) -> tuple[float, Any]:
    """Median seconds of `repeat` calls after one warm-up (CUDA-synchronized)."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def _rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Official-layout tiny checkpoints for the three tasks (made once per run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    maker = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(maker)
    out = {}
    for task in TASK_FOLDERS:
        path = root / task
        if not (path / ".done").exists():
            maker.make_tiny_checkpoint(task, "official", path, seed=0)
            (path / ".done").write_text("ok")
        out[task] = path
    return out


# ------------------------------------------------------------------------------------------- steps
def step_s0(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md
    import importlib.util
    import platform

    torch = _torch()
    device = _device(args.rehearse)

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "packages": {p: version(p) for p in ("diffusers", "transformers", "accelerate", "safetensors", "yunchang",
                                             "flash-attn", "flash_attn", "imageio-ffmpeg")},
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, nccl=".".join(map(str, torch.cuda.nccl.version())),
                   bf16_supported=torch.cuda.is_bf16_supported())
    return out


def step_s1(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    from launcher.wan.conditioning import draw_noise

    device = _device(args.rehearse)
    shape, seed = (16, 21, 60, 104), 42  # t2v-A14B 480P, 81 frames
    ours = draw_noise(shape, seed, device)
    official = torch.randn(*shape, dtype=torch.float32, generator=torch.Generator(device=device).manual_seed(seed),
                           device=device)  # text2video.py: seed_g = torch.Generator(device=self.device)
    cpu = draw_noise(shape, seed, "cpu")
    return {"equal_to_official": bool(torch.equal(ours, official)), "shape": list(shape), "seed": seed,
            "differs_from_cpu_draw": bool(not torch.equal(ours.cpu(), cpu)) if device.type == "cuda" else None,
            "ok": bool(torch.equal(ours, official))}


def _loop(forward, spec, latent0, contexts, mask, z, steps: int = 3, guide: float = 5.0):
    """3 UniPC steps with CFG and the expert switch (ti2v: per-token timesteps and image-frame blend)."""
    from launcher.wan import conditioning as cond
    from launcher.wan.solvers import make_scheduler

    sched = make_scheduler("unipc", steps, spec.sample_shift, device=latent0.device)
    latent = latent0.clone()
    for t in sched.timesteps:
        expert = spec.experts[0] if spec.boundary is None or t >= spec.boundary * 1000 else spec.experts[1]
        ts = (cond.ti2v_timesteps(mask, t, latent0[0].numel() // 4) if mask is not None
              else t.reshape(1).float().to(latent0.device))
        c, u = (forward(expert, latent, ts, ctx) for ctx in contexts)
        latent = sched.step((u + guide * (c - u))[None], t, latent[None], return_dict=False)[0][0]
        if mask is not None:
            latent = cond.ti2v_blend(z, latent, mask)
    return latent


def step_s2(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    from launcher.checkpoint import inspect_checkpoint
    from launcher.checkpoint.load import load_transformer
    from launcher.wan import conditioning as cond
    from launcher.wan.dit import WanDiT, pad_context
    from launcher.wan.tasks import TASKS
    from magcache.controller import ComputeAll

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = _device(args.rehearse)
    ckpts = _tiny_checkpoints(Path(args.workdir) / "ckpt")
    out: dict[str, Any] = {"tf32": False}
    worst = 0.0
    for task, ckpt in ckpts.items():
        spec = TASKS[task]
        info = inspect_checkpoint(ckpt, spec)
        dits = {dev: {e: WanDiT(load_transformer(info, e, dtype=torch.float32, device=dev)) for e in spec.experts}
                for dev in ("cpu", device)}
        g = torch.Generator().manual_seed(0)
        latent = torch.randn(spec.z_dim, 3, 8, 12, generator=g)
        y = (torch.randn(spec.dit_in_channels - spec.z_dim, 3, 8, 12, generator=g)
             if spec.dit_in_channels != spec.z_dim else None)
        text_dim = dits["cpu"][spec.experts[0]].model.config.text_dim
        contexts = [pad_context(torch.randn(n, text_dim, generator=g), spec.text_len) for n in (6, 9)]
        mask = z = None
        if task == "ti2v-5B":
            mask = cond.ti2v_mask(latent.shape)
            z = torch.randn(spec.z_dim, 1, 8, 12, generator=g)
            latent = cond.ti2v_blend(z, latent, mask)

        def run(dev):
            def fwd(expert, lat, ts, ctx):
                dit = dits[dev][expert]
                model_in = lat if y is None else torch.cat([lat, y.to(dev)])
                states = dit.embed_text(ctx.to(dev))
                return dit.forward(model_in, ts.to(dev), states, runner=ComputeAll(), index=0).float()

            on = (lambda t: t.to(dev)) if dev != "cpu" else (lambda t: t)
            with torch.no_grad():
                one = fwd(spec.experts[0], on(latent), torch.tensor([900.0]), on(contexts[0]))
                loop = _loop(fwd, spec, on(latent), [on(c) for c in contexts], None if mask is None else on(mask),
                             None if z is None else on(z))
            return one, loop

        (one_cpu, loop_cpu), (one_dev, loop_dev) = run("cpu"), run(device)
        out[task] = {"forward_rel": _rel(one_dev, one_cpu), "three_steps_rel": _rel(loop_dev, loop_cpu)}
        worst = max(worst, out[task]["forward_rel"], out[task]["three_steps_rel"])
    out["worst_rel"] = worst
    out["ok"] = worst <= 1e-5
    return out


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def step_s3(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    from safetensors.torch import load_file

    device = _device(args.rehearse)
    ckpts = _tiny_checkpoints(Path(args.workdir) / "ckpt")
    work = Path(args.workdir) / "s3"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "first.png"
    from PIL import Image

    Image.new("RGB", (80, 56), (120, 60, 30)).save(image)
    # the GPU default is bf16; on the CPU rehearsal bf16 must be asked for (autocast runs there too)
    dtype = [] if device.type == "cuda" else ["--dtype", "bfloat16"]
    magcache = ["--use_magcache", "--magcache_thresh", "0.5", "--sample_steps", "8"]
    runs = [("t2v-A14B", []), ("i2v-A14B", ["--image", str(image)]), ("ti2v-5B", []),
            ("t2v-A14B", ["--offload_model", "True"]), ("t2v-A14B", ["--convert_model_dtype"])]
    if device.type == "cuda":  # the rehearsal leaves it out: a CPU inductor build costs minutes and
        runs.append(("t2v-A14B", ["--compile"]))  # tests/test_compile.py proves compile on CPU already
    results = []
    for task, extra in runs:
        name = f"{task}{''.join(extra).replace('--', '-').replace('/', '_')[:40]}"
        latents = work / f"{len(results)}.safetensors"
        common = ["--task", task, "--size", "64*48" if task != "ti2v-5B" else "64*64", "--frame_num", "5", *magcache]
        t0 = time.perf_counter()
        proc = _cli("generate", "--ckpt_dir", str(ckpts[task]), "--prompt", "a red fox", "--base_seed", "3",
                    "--device", str(device), *dtype, *common, *extra, "--save_file", str(work / f"{len(results)}.mp4"),
                    "--save_latents", str(latents), "--overwrite")
        seconds = time.perf_counter() - t0
        entry: dict[str, Any] = {"name": name, "task": task, "flags": extra, "exit": proc.returncode,
                                 "seconds": round(seconds, 1)}
        if proc.returncode == 0:
            manifest = json.loads((work / f"{len(results)}.json").read_text())  # written next to the video
            lat = load_file(str(latents))["latents"]
            plan = _cli("plan", *common, *extra, "--json")
            planned = json.loads(plan.stdout)["skipped_forwards"] if plan.returncode == 0 else None
            entry.update(finite=bool(torch.isfinite(lat).all()), skipped=manifest["magcache"]["skipped_forwards"],
                         planned=planned)
            entry["ok"] = entry["finite"] and entry["skipped"] == planned
        else:
            entry.update(ok=False, error=proc.stderr.strip().splitlines()[-1:] if proc.stderr else [])
        results.append(entry)
    return {"runs": results, "ok": all(r["ok"] for r in results)}


def _block_config(rehearse: bool) -> dict[str, int]:
    if rehearse:
        return dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=2, text_dim=64)
    return dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=2, text_dim=4096)


def _block_flops(dim: int, ffn: int, tokens: int, text: int = 512) -> float:
    """Multiply-adds x 2 of one Wan block: q/k/v/o, cross q/o and k/v over the text, FFN, two attentions."""
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * text * 2 * dim * dim
    attention = 4 * tokens * tokens * dim + 4 * tokens * text * dim
    return float(linear + attention)


def step_s4(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    from diffusers import WanTransformer3DModel

    from launcher.wan.dit import WanDiT, compile_blocks, rope_angles

    device = _device(args.rehearse)
    cfg = _block_config(args.rehearse)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    torch.manual_seed(0)
    fp32 = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, **cfg).eval()
    ours_model = WanTransformer3DModel.from_config(fp32.config).eval()
    ours_model.load_state_dict(fp32.state_dict())
    diffusers_model = WanTransformer3DModel.from_config(fp32.config).eval()
    diffusers_model.load_state_dict(fp32.state_dict())
    for m in (fp32, ours_model, diffusers_model):
        m.to(device)
    ours = WanDiT(ours_model)
    # 480P / 720P 81-frame token counts of A14B: 21 x 30 x 52 and 21 x 45 x 80 patches
    grids = {"480P": (21, 30, 52), "720P": (21, 45, 80)} if not args.rehearse else {"tiny": (2, 4, 6)}
    half = torch.bfloat16
    results: dict[str, Any] = {"dim": dim, "heads": cfg["num_attention_heads"], "ffn": cfg["ffn_dim"],
                               "blocks": cfg["num_layers"]}
    def inputs(grid: tuple[int, int, int]):
        g = torch.Generator(device=device).manual_seed(1)
        tokens = grid[0] * grid[1] * grid[2]
        # bf16-valued tokens and text states, as the autocast patch and text embeddings hand them over
        x = torch.randn(1, tokens, dim, generator=g, device=device).to(half).float()
        context = (torch.randn(1, 512, dim, generator=g, device=device) * 0.5).to(half).float()
        tproj = torch.randn(1, 6, dim, generator=g, device=device) * 0.1
        return x, context, tproj, rope_angles(grid, cfg["attention_head_dim"], device=device)

    def runner(blocks, inp, *, amp: bool = True, rotary=None):
        """The blocks one after another on `inp` (our rotary unless diffusers' is given)."""
        x, context, tproj, rope = inp

        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=amp):
                h = x
                for block in blocks:
                    h = block(h, context, tproj, rope if rotary is None else rotary)
                return h.float()
        return run

    reference_dit = WanDiT(fp32)
    for label, grid in grids.items():
        inp = inputs(grid)
        tokens = inp[0].shape[1]
        rope_diffusers = ours_model.rope(torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2, device=device))
        ref = runner(reference_dit.blocks, inp, amp=False)()
        ours_s, ours_out = _timed(runner(ours.blocks, inp), device)
        # what diffusers' own forward hands its blocks under autocast: the patch embedding's bf16 output
        # and time projection cast to the text dtype (its policy: residual stream in bf16)
        as_diffusers = tuple(t.to(half) for t in inp[:3]) + (inp[3],)
        diff_s, diff_out = _timed(runner(diffusers_model.blocks, as_diffusers, rotary=rope_diffusers), device)
        flops = _block_flops(dim, cfg["ffn_dim"], tokens) * cfg["num_layers"]
        entry = {"tokens": tokens,
                 "ours_ms_per_block": round(ours_s / cfg["num_layers"] * 1e3, 3),
                 "diffusers_ms_per_block": round(diff_s / cfg["num_layers"] * 1e3, 3),
                 "ours_tflops": round(flops / ours_s / 1e12, 2), "diffusers_tflops": round(flops / diff_s / 1e12, 2),
                 "ours_bf16_rel_to_fp32": _rel(ours_out, ref), "diffusers_bf16_rel_to_fp32": _rel(diff_out, ref)}
        results[label] = entry
        del ref
    # compiled vs eager at the largest size
    label, grid = list(grids.items())[-1]
    compiled = WanDiT(WanTransformer3DModel.from_config(fp32.config).eval())
    compiled.model.load_state_dict(fp32.state_dict())
    compiled.model.to(device)
    compile_blocks([compiled])
    inp = inputs(grid)

    def run_with(dit):
        return runner(dit.blocks, inp)

    t0 = time.perf_counter()
    run_with(compiled)()
    _sync(device)
    first_call_s = time.perf_counter() - t0
    eager_s, eager_out = _timed(run_with(ours), device)
    comp_s, comp_out = _timed(run_with(compiled), device)
    results["compile"] = {"size": label, "first_call_s": round(first_call_s, 1),
                          "eager_ms_per_block": round(eager_s / cfg["num_layers"] * 1e3, 3),
                          "compiled_ms_per_block": round(comp_s / cfg["num_layers"] * 1e3, 3),
                          "compiled_vs_eager_rel": _rel(comp_out, eager_out)}
    results["ok"] = all(math.isfinite(v["ours_bf16_rel_to_fp32"]) for k, v in results.items() if k in grids)
    return results


def step_s5(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallel.fsdp import load_sharded, mixed_precision

    device = _device(args.rehearse)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    out: dict[str, Any] = {"backend": backend}
    try:
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        c = torch.ones(4)
        dist.all_reduce(c)
        out["world_all_reduce"] = bool(t.sum().item() == 4 and c.sum().item() == 4)
        # the 2-D mesh path of parallel/mesh.py: device mesh (split_group on the mixed parent) + gloo twin
        mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("cfg", "sp"))
        twin = init_device_mesh("cpu", (1, 1), mesh_dim_names=("cfg", "sp"),
                                backend_override={"cfg": "gloo", "sp": "gloo"})
        ok = True
        for name in ("cfg", "sp"):
            a = torch.full((2,), 3.0, device=device)
            dist.all_reduce(a, group=mesh.get_group(name))
            b = torch.full((2,), 3.0)
            dist.all_reduce(b, op=dist.ReduceOp.MIN, group=twin.get_group(name))
            ok = ok and a.sum().item() == 6 and b.sum().item() == 6
        out["mesh_2d_groups"] = bool(ok)
        # FSDP2 on a one-rank mesh, bf16 mixed precision, loaded rows == a plain load
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)
        state = {k: v.detach().cpu() for k, v in plain.state_dict().items()}

        class Rows:
            def keys(self):
                return state.keys()

            def shape(self, key):
                return tuple(state[key].shape)

            def get(self, key):
                return state[key]

            def get_slice(self, key, start, stop):
                return state[key][start:stop]

        with torch.device("meta"):
            sharded = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        one = init_device_mesh(device.type, (1,))
        for layer in (sharded[0], sharded[2]):
            fully_shard(layer, mesh=one, mp_policy=mixed_precision(torch.bfloat16))
        load_sharded(sharded, Rows(), device=device)
        x = torch.randn(8, 64, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            got = sharded[2](sharded[1](sharded[0](x))).float()
            want = plain(x).float()
        out["fsdp_rel"] = _rel(got, want)
        out["ok"] = out["world_all_reduce"] and out["mesh_2d_groups"] and out["fsdp_rel"] <= 1e-6
    finally:
        dist.destroy_process_group()
    return out


def step_s6(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    from diffusers import AutoencoderKLWan

    device = _device(args.rehearse)
    if args.rehearse:
        vae = AutoencoderKLWan(base_dim=16, z_dim=48, in_channels=12, out_channels=12, decoder_base_dim=24,
                               is_residual=True, patch_size=2, scale_factor_spatial=16, dim_mult=[1, 2, 4, 4],
                               temperal_downsample=[False, True, True], num_res_blocks=2)
        latent_shape, size = (1, 48, 2, 4, 5), "80*64"
    else:  # the Wan2.2 VAE config (ti2v-5B), random weights; 1280*704, 121 frames -> 31 latent frames
        vae = AutoencoderKLWan(base_dim=160, z_dim=48, in_channels=12, out_channels=12, decoder_base_dim=256,
                               is_residual=True, patch_size=2, scale_factor_spatial=16, dim_mult=[1, 2, 4, 4],
                               temperal_downsample=[False, True, True], num_res_blocks=2)
        latent_shape, size = (1, 48, 31, 44, 80), "1280*704"
    vae = vae.to(device).eval()
    params_gb = sum(p.numel() * p.element_size() for p in vae.parameters()) / 2**30
    z = torch.randn(*latent_shape, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(z).sample
    _sync(device)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"size": size, "latent": list(latent_shape), "video": list(video.shape),
                           "vae_params_gib": round(params_gb, 3), "decode_s": round(seconds, 2)}
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        dit_gib = 5.0e9 * 4 / 2**30  # ti2v-5B DiT in float32 (official keeps float32 params without --convert_model_dtype)
        out.update(decode_peak_gib=round(peak, 2),
                   with_dit_resident_gib=round(peak + params_gb + dit_gib, 2),
                   with_offload_gib=round(peak + params_gb, 2),
                   fits_24gb_without_offload=peak + params_gb + dit_gib <= 24.0,
                   fits_24gb_with_offload=peak + params_gb <= 24.0)
    out["ok"] = bool(torch.isfinite(video).all())
    return out


def step_s7(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.gpu_quant import step_quant  # the step's body lives with the quantization benchmarks

    return step_quant(args, device_of=_device, timed=_timed, rel=_rel)


STEPS: dict[str, tuple[str, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "S0": ("versions and device", step_s0),
    "S1": ("CUDA noise equals official's draw", step_s1),
    "S2": ("CUDA vs CPU float32, TF32 off", step_s2),
    "S3": ("CLI: three tasks, offload, convert, compile", step_s3),
    "S4": ("A14B block dims: ours vs diffusers, bf16 error, compile", step_s4),
    "S5": ("NCCL + gloo groups, 2-D mesh, FSDP2 load", step_s5),
    "S6": ("VAE decode peak at 1280*704", step_s6),
    "S7": ("FP8/INT8 linears at A14B dims vs bf16, one block with --quantize", step_s7),
}


# -------------------------------------------------------------------------------------------- driver
def run_step_in_child(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One step in a fresh interpreter (a hung CUDA call or a crash cannot take the others down)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", name, "--workdir", args.workdir]
    if args.rehearse:
        cmd.append("--rehearse")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1), "timeout_s": timeout}
    seconds = round(time.perf_counter() - t0, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(STEP_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "seconds": seconds, "exit": proc.returncode, "error": tail}
    figures = json.loads(lines[-1][len(STEP_PREFIX):])
    return {"status": "ok" if figures.get("ok", True) else "failed", "seconds": seconds, "figures": figures}


def render(results_dir: Path, markdown: Path) -> None:
    """The BENCHMARKS.md section from the GPU results only (rehearsals never appear as GPU figures)."""
    import glob

    records = []
    for path in sorted(glob.glob(str(results_dir / "gpu-*.json"))):
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("benchmark") == "gpu-check" and not record.get("flags", {}).get("rehearse"):
            records.append(record)
    if not records:
        body = ("**No GPU has run `scripts/gpu_check.py` yet.** Every figure in this file was measured on CPU; "
                "there are no GPU figures here, neither measured nor estimated. `python scripts/gpu_check.py` on "
                "one CUDA GPU writes `benchmarks/results/gpu-<device>.json` and fills this section.")
        replace_section(markdown, SECTION, body)
        return
    parts = []
    for rec in records:
        dev = rec["figures"].get("S0", {}).get("figures", {})
        parts.append(f"### {dev.get('name', rec['name'])} — {rec['date']}\n")
        rows = [(name, STEPS[name][0], step["status"], f"{step['seconds']} s") for name, step in rec["figures"].items()]
        parts.append(markdown_table(["step", "what", "status", "time"], rows, align="lllr"))
        s4 = rec["figures"].get("S4", {}).get("figures", {})
        grid_rows = [(k, v["tokens"], v["ours_ms_per_block"], v["diffusers_ms_per_block"], v["ours_tflops"],
                      f"{v['ours_bf16_rel_to_fp32']:.2e}", f"{v['diffusers_bf16_rel_to_fp32']:.2e}")
                     for k, v in s4.items() if isinstance(v, dict) and "tokens" in v]
        if grid_rows:
            parts.append("\nA14B block dimensions (measured):\n")
            parts.append(markdown_table(["size", "tokens", "ours ms/block", "diffusers ms/block", "ours TFLOP/s",
                                         "ours bf16 vs fp32", "diffusers bf16 vs fp32"], grid_rows))
        parts.append("")
    replace_section(markdown, SECTION, "\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="run every step on CPU at tiny size (CI)")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, e.g. S0,S2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    parser.add_argument("--no-save", action="store_true", help="print the JSON, write nothing")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render_only:
        render(args.results_dir, args.markdown)
        return 0
    if args.run_step:  # child: one step, one JSON line
        figures = STEPS[args.run_step][1](args)
        print(STEP_PREFIX + json.dumps(figures), flush=True)
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if not args.rehearse and not _torch().cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --rehearse to try the script on CPU",
              file=sys.stderr)
        return 2
    timeouts = REHEARSAL_TIMEOUTS if args.rehearse else TIMEOUTS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        args.workdir = work
        figures: dict[str, Any] = {}
        for name in steps:
            result = run_step_in_child(name, args, timeouts[name])
            figures[name] = result
            print(f"[gpu_check] {name} {STEPS[name][0]}: {result['status']} in {result['seconds']} s", flush=True)
    device_name = figures.get("S0", {}).get("figures", {}).get("name", "cpu")
    slug = "rehearsal-cpu" if args.rehearse else "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    record = result_record(benchmark="gpu-check", name=f"gpu-{slug}", flags={"rehearse": args.rehearse, "steps": steps},
                           figures=figures, total_runtime_s=round(time.perf_counter() - started, 1))
    ok = all(f["status"] == "ok" for f in figures.values())
    if args.no_save:
        print(json.dumps(record, indent=2))
    else:
        path = write_result(record, args.results_dir)
        render(args.results_dir, args.markdown)
        print(f"[gpu_check] wrote {path} ({'all steps ok' if ok else 'some steps failed'}) at {now_utc()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
