#!/usr/bin/env python
"""The prepared GPU proof: one command, one GPU, steps whose GPU budgets add up to 420 s (7 minutes).

    python scripts/gpu_check.py --results-dir DIR   # on a CUDA machine: each step's JSON lands in DIR
                                                    # the moment the step ends (a run cut off at any
                                                    # point keeps every finished step's figures)
    python scripts/gpu_check.py --save              # also writes benchmarks/results/gpu-<device>.json and
                                                    # the "GPU check" section of BENCHMARKS.md (the repo)
    python scripts/gpu_check.py --rehearse          # on CPU, every step at tiny size (CI runs this): proves
                                                    # the script itself, measures nothing about GPUs
    python scripts/gpu_check.py --only S0,S4        # a subset
    python scripts/gpu_check.py --render-only       # BENCHMARKS.md from the stored gpu-*.json

Nothing is written into the repository unless --save is given. Steps (each a child process of this
script, killed at its budget; one failing step does not stop the others; each records its status,
seconds and figures or error):

- S0 versions, device, attention kernels importable, NCCL;
- S1 the noise our CUDA generator draws equals official's draw (`torch.Generator(device)`);
- S2 CUDA vs CPU float32 on a tiny checkpoint with TF32 off: one DiT forward and 3 CFG steps
  of each task, relative difference <= 1e-5;
- S3 CLI runs on the tiny checkpoints: the three tasks in the default dtype, and t2v with
  `--offload_model True`, `--convert_model_dtype`: exit 0, finite latents, MagCache's skipped
  forwards equal `plan --json`'s, the attention kernel the manifest records;
- S3c the same t2v CLI run with `--compile` (its own step: a Triton failure loses nothing else);
- S4 real A14B block dimensions (dim 5120, 40 heads, FFN 13824; 2 blocks, random weights) at the
  480P and 720P token counts: our blocks (with the kernel `--attention auto` picks) vs diffusers'
  blocks (ms per block, TFLOP/s, the attention backend of each), the bf16 error of each against a
  float32 copy; the pinned host bytes of the blocks against their weight bytes;
- S4c the same blocks under `--compile`: first-call seconds, eager and compiled ms per block at
  480P and 720P;
- S5 one-rank NCCL + gloo groups built the way parallel/mesh.py builds every mesh dim (groups by
  enumeration with an explicit backend, wrapped by `DeviceMesh.from_group`), and an FSDP2-loaded
  model on such a mesh equal to a plainly loaded one;
- S6 Wan2.2 VAE decode peak memory at 1280*704 (random weights, real config), and what that means
  next to the ti2v-5B DiT on a 24 GB card with and without `--offload_model`;
- S7 FP8 (sm89+) and INT8 linears at A14B dims against bf16 (ms, TFLOP/s, error against float32)
  and one block with `--quantize fp8` / `int8` (benchmarks/gpu_quant.py).

Adding a step: a function `(args) -> dict` (with "ok") decorated with `@step("S7", "what", gpu_s=..,
rehearsal_s=..)`; keep the GPU budgets' sum at or under GPU_BUDGET_S (`tests/test_gpu_check.py`
checks it). Under `--rehearse` the same code runs on the CPU with tiny sizes: figures are recorded
as a rehearsal and never rendered as GPU figures.
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
from dataclasses import dataclass
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
#: the whole check on one H100 (a 7-minute slot less margin): the steps' GPU budgets add up to at most this
GPU_BUDGET_S = 420


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[argparse.Namespace], dict[str, Any]]
    #: seconds the step may take on one GPU (its child is killed there)
    gpu_s: int
    #: seconds under --rehearse on a CPU (tiny sizes, but CPU inductor builds are slow)
    rehearsal_s: int


STEPS: dict[str, Step] = {}


def step(name: str, title: str, *, gpu_s: int, rehearsal_s: int) -> Callable:
    """Register a step (in run order)."""
    def register(fn: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable:
        STEPS[name] = Step(title, fn, gpu_s, rehearsal_s)
        return fn
    return register
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


def _kernel(device) -> str:
    """The attention kernel `--attention auto` runs for bf16 on `device` (what our blocks use below)."""
    from parallel.attention import Host, resolve

    return resolve("auto", Host.of(device, _torch().bfloat16))


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
@step("S0", "versions and device", gpu_s=20, rehearsal_s=60)
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
        "flash_attn_interface_importable": importlib.util.find_spec("flash_attn_interface") is not None,
        "device": str(device),
        "attention_auto_bf16": _kernel(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, nccl=".".join(map(str, torch.cuda.nccl.version())),
                   bf16_supported=torch.cuda.is_bf16_supported())
    return out


@step("S1", "CUDA noise equals official's draw", gpu_s=15, rehearsal_s=60)
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


@step("S2", "CUDA vs CPU float32, TF32 off", gpu_s=40, rehearsal_s=240)
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


def _cli_runs(args: argparse.Namespace, runs: list[tuple[str, list[str]]], folder: str) -> dict[str, Any]:
    """`generate` on the tiny checkpoints for each (task, extra flags); each run checked against `plan --json`."""
    torch = _torch()
    from safetensors.torch import load_file

    device = _device(args.rehearse)
    ckpts = _tiny_checkpoints(Path(args.workdir) / "ckpt")
    work = Path(args.workdir) / folder
    work.mkdir(parents=True, exist_ok=True)
    image = work / "first.png"
    from PIL import Image

    Image.new("RGB", (80, 56), (120, 60, 30)).save(image)
    # the GPU default is bf16; on the CPU rehearsal bf16 must be asked for (autocast runs there too)
    dtype = [] if device.type == "cuda" else ["--dtype", "bfloat16"]
    magcache = ["--use_magcache", "--magcache_thresh", "0.5", "--sample_steps", "8"]
    runs = [(task, [str(image) if f == "{image}" else f for f in extra]) for task, extra in runs]
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
                         planned=planned, attention=manifest["world"].get("attention"))
            entry["ok"] = entry["finite"] and entry["skipped"] == planned
        else:
            entry.update(ok=False, error=proc.stderr.strip().splitlines()[-1:] if proc.stderr else [])
        results.append(entry)
    return {"runs": results, "ok": all(r["ok"] for r in results)}


@step("S3", "CLI: three tasks, offload, convert", gpu_s=80, rehearsal_s=900)
def step_s3(args: argparse.Namespace) -> dict[str, Any]:
    return _cli_runs(args, [("t2v-A14B", []), ("i2v-A14B", ["--image", "{image}"]), ("ti2v-5B", []),
                            ("t2v-A14B", ["--offload_model", "True"]), ("t2v-A14B", ["--convert_model_dtype"])], "s3")


@step("S3c", "CLI: t2v with --compile", gpu_s=50, rehearsal_s=900)
def step_s3c(args: argparse.Namespace) -> dict[str, Any]:
    return _cli_runs(args, [("t2v-A14B", ["--compile", "--dist-timeout", "900"])], "s3c")


def _block_config(rehearse: bool) -> dict[str, int]:
    if rehearse:
        return dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=2, text_dim=64)
    return dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=2, text_dim=4096)


def _block_flops(dim: int, ffn: int, tokens: int, text: int = 512) -> float:
    """Multiply-adds x 2 of one Wan block: q/k/v/o, cross q/o and k/v over the text, FFN, two attentions."""
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * text * 2 * dim * dim
    attention = 4 * tokens * tokens * dim + 4 * tokens * text * dim
    return float(linear + attention)


class _Blocks:
    """S4/S4c's model: two A14B-dimension blocks (random weights), a float32 reference, our blocks
    with the kernel `--attention auto` picks, diffusers' blocks, and their inputs at 480P / 720P."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch = _torch()
        from diffusers import WanTransformer3DModel

        from launcher.wan.dit import LocalSequence, WanDiT

        self.torch = torch
        self.device = device = _device(args.rehearse)
        self.cfg = cfg = _block_config(args.rehearse)
        self.dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        torch.manual_seed(0)
        self.fp32 = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256,
                                          **cfg).eval()
        self.kernel = _kernel(device)
        self.ours = WanDiT(self.copy(), LocalSequence(self.kernel))
        self.fp32.to(device)
        # 480P / 720P 81-frame token counts of A14B: 21 x 30 x 52 and 21 x 45 x 80 patches
        self.grids = {"480P": (21, 30, 52), "720P": (21, 45, 80)} if not args.rehearse else {"tiny": (2, 4, 6)}
        self.half = torch.bfloat16

    def copy(self):
        from diffusers import WanTransformer3DModel

        m = WanTransformer3DModel.from_config(self.fp32.config).eval()
        m.load_state_dict(self.fp32.state_dict())
        return m.to(self.device)

    def inputs(self, grid: tuple[int, int, int]):
        from launcher.wan.dit import rope_angles

        torch, device, dim = self.torch, self.device, self.dim
        g = torch.Generator(device=device).manual_seed(1)
        tokens = grid[0] * grid[1] * grid[2]
        # bf16-valued tokens and text states, as the autocast patch and text embeddings hand them over
        x = torch.randn(1, tokens, dim, generator=g, device=device).to(self.half).float()
        context = (torch.randn(1, 512, dim, generator=g, device=device) * 0.5).to(self.half).float()
        tproj = torch.randn(1, 6, dim, generator=g, device=device) * 0.1
        return x, context, tproj, rope_angles(grid, self.cfg["attention_head_dim"], device=device)

    def runner(self, blocks, inp, *, amp: bool = True, rotary=None):
        """The blocks one after another on `inp` (our rotary unless diffusers' is given)."""
        torch = self.torch
        x, context, tproj, rope = inp

        def run():
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.half, enabled=amp):
                h = x
                for block in blocks:
                    h = block(h, context, tproj, rope if rotary is None else rotary)
                return h.float()
        return run

    def ms_per_block(self, seconds: float) -> float:
        return round(seconds / self.cfg["num_layers"] * 1e3, 3)


@step("S4", "A14B block dims: ours vs diffusers, attention kernels, bf16 error, pinned bytes", gpu_s=60,
      rehearsal_s=300)
def step_s4(args: argparse.Namespace) -> dict[str, Any]:
    from launcher.wan.dit import WanDiT
    from launcher.wan.residency import HostResident, rounded_bytes

    b = _Blocks(args)
    torch, device, cfg = b.torch, b.device, b.cfg
    diffusers_model = b.copy()
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    results: dict[str, Any] = {
        "dim": b.dim, "heads": cfg["num_attention_heads"], "ffn": cfg["ffn_dim"], "blocks": cfg["num_layers"],
        "attention": {"ours": b.kernel,
                      "diffusers": str(_AttentionBackendRegistry.get_active_backend()[0].value)},
    }
    reference_dit = WanDiT(b.fp32)
    for label, grid in b.grids.items():
        inp = b.inputs(grid)
        tokens = inp[0].shape[1]
        rope_diffusers = diffusers_model.rope(torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2, device=device))
        ref = b.runner(reference_dit.blocks, inp, amp=False)()
        ours_s, ours_out = _timed(b.runner(b.ours.blocks, inp), device)
        # what diffusers' own forward hands its blocks under autocast: the patch embedding's bf16 output
        # and time projection cast to the text dtype (its policy: residual stream in bf16)
        as_diffusers = tuple(t.to(b.half) for t in inp[:3]) + (inp[3],)
        diff_s, diff_out = _timed(b.runner(diffusers_model.blocks, as_diffusers, rotary=rope_diffusers), device)
        flops = _block_flops(b.dim, cfg["ffn_dim"], tokens) * cfg["num_layers"]
        results[label] = {"tokens": tokens,
                          "ours_ms_per_block": b.ms_per_block(ours_s), "diffusers_ms_per_block": b.ms_per_block(diff_s),
                          "ours_tflops": round(flops / ours_s / 1e12, 2), "diffusers_tflops": round(flops / diff_s / 1e12, 2),
                          "ours_bf16_rel_to_fp32": _rel(ours_out, ref), "diffusers_bf16_rel_to_fp32": _rel(diff_out, ref)}
        del ref
    # the host home an offloaded expert gets: pinned in place, no power-of-two rounding (issue 23 item 1)
    del diffusers_model
    host = b.copy().cpu()
    sizes = [p.untyped_storage().nbytes() for p in [*host.parameters(), *host.buffers()]]
    home = HostResident(host, pin=device.type == "cuda")
    results["host"] = {"weight_bytes": home.storage_bytes, "pinned_bytes": home.pinned_bytes,
                       "pin_memory_rule_bytes": rounded_bytes(sizes),
                       "pinned_over_weights": round(home.pinned_bytes / home.storage_bytes, 4)}
    results["ok"] = all(math.isfinite(results[k]["ours_bf16_rel_to_fp32"]) for k in b.grids) and (
        device.type != "cuda" or home.pinned_bytes == home.storage_bytes)
    return results


@step("S4c", "A14B block dims under --compile: first call, eager vs compiled ms", gpu_s=60, rehearsal_s=600)
def step_s4c(args: argparse.Namespace) -> dict[str, Any]:
    from launcher.wan.dit import LocalSequence, WanDiT, compile_blocks

    b = _Blocks(args)
    compiled = WanDiT(b.copy(), LocalSequence(b.kernel))
    compile_blocks([compiled])
    results: dict[str, Any] = {"attention": b.kernel}
    for label, grid in b.grids.items():
        inp = b.inputs(grid)
        t0 = time.perf_counter()
        b.runner(compiled.blocks, inp)()
        _sync(b.device)
        first_call_s = time.perf_counter() - t0
        eager_s, eager_out = _timed(b.runner(b.ours.blocks, inp), b.device)
        comp_s, comp_out = _timed(b.runner(compiled.blocks, inp), b.device)
        results[label] = {"first_call_s": round(first_call_s, 1), "eager_ms_per_block": b.ms_per_block(eager_s),
                          "compiled_ms_per_block": b.ms_per_block(comp_s),
                          "compiled_vs_eager_rel": _rel(comp_out, eager_out)}
    results["ok"] = all(results[k]["compiled_vs_eager_rel"] < 1e-2 for k in b.grids)
    return results


@step("S5", "NCCL + gloo groups by enumeration, DeviceMesh.from_group, FSDP2 load", gpu_s=30, rehearsal_s=120)
def step_s5(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from parallel.fsdp import load_sharded, mixed_precision
    from parallel.mesh import compute_backend, enumerated_group, one_dim_mesh

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
        # how parallel/mesh.py builds every mesh dim: groups by enumeration with an explicit backend
        # (nccl on CUDA, never split from the mixed world group), wrapped by DeviceMesh.from_group, and
        # a gloo twin for CPU values; on one rank each partition is [[0]]
        ok = True
        meshes = {}
        for name in ("cfg", "sp"):
            group = enumerated_group([[0]], compute_backend(device))
            twin = enumerated_group([[0]], "gloo")
            meshes[name] = one_dim_mesh(group, device.type, name)
            a = torch.full((2,), 3.0, device=device)
            dist.all_reduce(a, group=meshes[name].get_group())
            b = torch.full((2,), 3.0)
            dist.all_reduce(b, op=dist.ReduceOp.MIN, group=twin)
            ok = ok and a.sum().item() == 6 and b.sum().item() == 6
            out[f"{name}_backend"] = dist.get_backend(group)
        out["enumerated_groups"] = bool(ok)
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
        one = meshes["sp"]
        for layer in (sharded[0], sharded[2]):
            fully_shard(layer, mesh=one, mp_policy=mixed_precision(torch.bfloat16))
        load_sharded(sharded, Rows(), device=device)
        x = torch.randn(8, 64, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            got = sharded[2](sharded[1](sharded[0](x))).float()
            want = plain(x).float()
        out["fsdp_rel"] = _rel(got, want)
        out["ok"] = out["world_all_reduce"] and out["enumerated_groups"] and out["fsdp_rel"] <= 1e-6
    finally:
        dist.destroy_process_group()
    return out


@step("S6", "VAE decode peak at 1280*704", gpu_s=35, rehearsal_s=120)
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


@step("S7", "FP8/INT8 linears at A14B dims vs bf16, one block with --quantize", gpu_s=30, rehearsal_s=120)
def step_s7(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.gpu_quant import step_quant  # the step's body lives with the quantization benchmarks

    return step_quant(args, device_of=_device, timed=_timed, rel=_rel)


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
        rows = [(name, STEPS[name].title if name in STEPS else "", result["status"], f"{result['seconds']} s")
                for name, result in rec["figures"].items()]
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


def budget_lines(steps: list[str], rehearse: bool) -> list[str]:
    """The per-step budgets this run will enforce, and their sum against GPU_BUDGET_S."""
    key = "rehearsal_s" if rehearse else "gpu_s"
    total = sum(getattr(STEPS[n], key) for n in steps)
    lines = [f"[gpu_check] budget {n:<4} GPU {STEPS[n].gpu_s:>3} s, rehearsal {STEPS[n].rehearsal_s:>4} s  {STEPS[n].title}"
             for n in steps]
    whole = sum(STEPS[n].gpu_s for n in STEPS)
    lines.append(f"[gpu_check] budget total {total} s for these steps ({'CPU rehearsal' if rehearse else 'GPU'}); "
                 f"all steps on a GPU: {whole} s of {GPU_BUDGET_S} s")
    return lines


def _append(results_dir: Path, name: str, result: dict[str, Any], context: dict[str, Any]) -> None:
    """One finished step: DIR/<step>.json (atomic) and a line in DIR/steps.jsonl, written at once."""
    payload = {"step": name, "title": STEPS[name].title, **context, **result}
    tmp = results_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, results_dir / f"{name}.json")
    with open(results_dir / "steps.jsonl", "a") as f:
        f.write(json.dumps(payload) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="run every step on CPU at tiny size (CI)")
    parser.add_argument("--only", "--steps", dest="steps", default=",".join(STEPS),
                        help="comma-separated subset, e.g. S0,S2")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="each finished step's JSON lands here at once (default: a new folder under the temp dir)")
    parser.add_argument("--save", action="store_true",
                        help="also write the combined record into benchmarks/results and BENCHMARKS.md (the repo)")
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render_only:
        render(RESULTS_DIR, args.markdown)
        return 0
    if args.run_step:  # child: one step, one JSON line
        figures = STEPS[args.run_step].run(args)
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
    results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="gpu_check_results_"))
    results_dir.mkdir(parents=True, exist_ok=True)
    for line in budget_lines(steps, args.rehearse):
        print(line, flush=True)
    print(f"[gpu_check] results: {results_dir} (one JSON per step, written as each ends)", flush=True)
    context = {"rehearse": args.rehearse, "date": now_utc()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        args.workdir = work
        figures: dict[str, Any] = {}
        for name in steps:
            limit = STEPS[name].rehearsal_s if args.rehearse else STEPS[name].gpu_s
            result = run_step_in_child(name, args, limit)
            figures[name] = result
            _append(results_dir, name, result, context)
            print(f"[gpu_check] {name} {STEPS[name].title}: {result['status']} in {result['seconds']} s", flush=True)
    device_name = figures.get("S0", {}).get("figures", {}).get("name", "cpu")
    slug = "rehearsal-cpu" if args.rehearse else "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    record = result_record(benchmark="gpu-check", name=f"gpu-{slug}", flags={"rehearse": args.rehearse, "steps": steps},
                           figures=figures, total_runtime_s=round(time.perf_counter() - started, 1))
    ok = all(f["status"] == "ok" for f in figures.values())
    if args.save:
        path = write_result(record, RESULTS_DIR)
        render(RESULTS_DIR, args.markdown)
        print(f"[gpu_check] wrote {path} and {args.markdown}")
    print(f"[gpu_check] {'all steps ok' if ok else 'some steps failed'} at {now_utc()}; per-step JSON in {results_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
