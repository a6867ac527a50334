#!/usr/bin/env python
"""MagCache on CPU: one model, one request, one seed, run uncached and cached in one process.

    python scripts/bench_magcache.py                                   # ti2v-5B, E006K2R02, 50 steps
    python scripts/bench_magcache.py --task t2v-A14B --retention 0.4   # E006K2R04, 40 steps
    python scripts/bench_magcache.py --steps 10 --repeats 1 --no-save  # a quick smoke run, writes nothing
    python scripts/bench_magcache.py --render-only                     # BENCHMARKS.md from the JSON files

The DiT is a random `--preset bench` checkpoint (bigger DiT, tiny T5/VAE) built in a temporary
folder unless `--ckpt-dir` is given, so blocks dominate a forward as they do at full size.
Generations alternate uncached (ComputeAll) / cached (MagCacheController, schedule from
`launcher.planner.schedule.magcache_setup`) in ABBA order after a warm-up pair, and report:

- forward-count speedup: forwards / computed forwards (checked against the set-up's plan);
- wall-clock speedup of the denoising loop (median uncached / median cached) and the
  efficiency = wall speedup / forward speedup (1.0: a skipped forward costs nothing);
- end-to-end speedup (text encode + prepare + denoise + VAE decode);
- a phase profile (module hooks and perf_counter, separate un-timed pass) of where the loop
  spends the time outside the blocks, which bounds the efficiency any skip can reach;
- a microbenchmark of the skip path alone (controller `x + residual`) against one bare add
  and the compute path, with the aten ops and bytes it allocates.

Writes `benchmarks/results/<name>.json` and re-renders the MagCache section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BENCHMARKS_MD, BenchRun, RESULTS_DIR, fmt_seconds, load_results, markdown_table, replace_section, summarize,
)

BENCHMARK = "magcache-cpu"
SECTION = "magcache-cpu"
TARGET_EFFICIENCY = 0.97
#: a few hundred tokens: blocks dominate a CPU forward and 50 steps x 3 repeats fit in minutes
DEFAULT_SIZE = {"ti2v-5B": "256*256", "t2v-A14B": "128*128"}
#: repeats further apart than this (max - min, % of the median) make a wall-clock figure unreliable
NOISY_SPREAD_PCT = 10.0
#: ops that mean a copy or a device->host sync; none may run on the skip path
SUSPECT_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::item", "aten::_local_scalar_dense",
               "aten::to", "aten::_to_copy", "aten::cat", "aten::empty_like")


# -- setup --------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every generation of the run shares: models, pipeline, request and MagCache flags."""

    args: argparse.Namespace
    cfg: Any  # launcher.config.RunConfig
    pipeline: Any  # launcher.wan.pipeline.WanPipeline
    request: Any  # launcher.wan.pipeline.Request
    checkpoint: dict[str, Any]

    def uncached(self):
        from magcache.controller import ComputeAll

        return ComputeAll()

    def cached(self):
        from launcher.planner.schedule import Sampling, magcache_setup
        from magcache.controller import MagCacheController

        return MagCacheController(magcache_setup(Sampling.of(self.cfg)).schedule())

    def plan(self):
        from launcher.planner.schedule import Sampling, magcache_setup

        return magcache_setup(Sampling.of(self.cfg)).plan


def _make_checkpoint(task: str, out: Path, seed: int) -> None:
    from launcher.checkpoint.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(task, "official", out, seed=seed, preset="bench")


def load_bench(args: argparse.Namespace, ckpt_dir: Path) -> Bench:
    from launcher.checkpoint import inspect_checkpoint
    from launcher.config import run_config_from_flags
    from launcher.engine.models import load_models
    from launcher.engine.placement import placement_for
    from launcher.wan.pipeline import Request, WanPipeline

    cfg = run_config_from_flags({
        "task": args.task, "ckpt_dir": ckpt_dir, "prompt": args.prompt, "size": args.size, "frame_num": args.frames,
        "sample_steps": args.steps, "base_seed": args.seed, "device": "cpu", "use_magcache": True,
        "magcache_thresh": args.thresh, "magcache_K": args.K, "retention_ratio": args.retention})
    info = inspect_checkpoint(cfg.ckpt_dir, cfg.task)
    t0 = time.perf_counter()
    models, _ = load_models(cfg, info, placement_for(cfg))
    load_s = time.perf_counter() - t0
    request = Request(prompt=cfg.prompt, negative_prompt=cfg.negative_or_default, seed=args.seed, width=cfg.width,
                      height=cfg.height, max_area=cfg.max_area, frame_num=cfg.frame_num, steps=cfg.sample_steps,
                      shift=cfg.sample_shift, solver=cfg.sample_solver, guide_scale=cfg.guide_scale)
    dit = next(iter(models.experts.values())).model
    c = dit.config
    checkpoint = {
        "path": str(ckpt_dir) if args.ckpt_dir else "random --preset bench (temporary)", "load_s": round(load_s, 3),
        "dit": {"dim": c.num_attention_heads * c.attention_head_dim, "heads": c.num_attention_heads,
                "layers": c.num_layers, "ffn_dim": c.ffn_dim, "experts": len(models.experts),
                "params_per_expert_m": round(sum(p.numel() for p in dit.parameters()) / 1e6, 2),
                "dtype": str(next(dit.parameters()).dtype).replace("torch.", "")},
    }
    return Bench(args=args, cfg=cfg, pipeline=WanPipeline(models, decode=True), request=request, checkpoint=checkpoint)


# -- timed generations --------------------------------------------------------------------------
@dataclass
class Run:
    mode: str  # "uncached" | "cached"
    phases: dict[str, float]  # encode_text, prepare, denoise, decode (Result.timings)
    e2e_s: float
    cpu_s: float  # process CPU time, generation start to the last step's end (noise-robust cross-check)
    computed: int
    skipped: tuple[int, ...]
    seq_len: int
    latents: torch.Tensor = field(repr=False)


def generate(bench: Bench, mode: str) -> Run:
    runner = bench.uncached() if mode == "uncached" else bench.cached()
    marks: list[float] = []
    bench.pipeline.on_step = lambda i, n: marks.append(time.process_time()) if i == n else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = bench.pipeline.generate(bench.request, runner)
    e2e = time.perf_counter() - t0
    bench.pipeline.on_step = None
    skipped = tuple(d.index for d in runner.decisions if d.skip)
    return Run(mode=mode, phases=dict(result.timings), e2e_s=e2e, cpu_s=marks[-1] - cpu0,
               computed=len(runner.decisions) - len(skipped), skipped=skipped, seq_len=result.seq_len,
               latents=result.latents)


def interleaved(bench: Bench, repeats: int, warmup: int, log: Callable[[str], None]) -> tuple[list[Run], list[Run]]:
    """Warm-up pairs (discarded), then ABBA pairs so a slow drift of the machine hits both modes alike."""
    for _ in range(warmup):
        for mode in ("uncached", "cached"):
            run = generate(bench, mode)
            log(f"  warm-up {mode:8s} denoise {run.phases['denoise']:7.2f} s")
    runs: dict[str, list[Run]] = {"uncached": [], "cached": []}
    for r in range(repeats):
        for mode in (("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")):
            run = generate(bench, mode)
            runs[mode].append(run)
            log(f"  repeat {r + 1}/{repeats} {mode:8s} denoise {run.phases['denoise']:7.2f} s  "
                f"end-to-end {run.e2e_s:7.2f} s")
    return runs["uncached"], runs["cached"]


# -- profile: where the loop's time goes (separate pass; hooks cost a few microseconds) ----------
class PhaseClock:
    """Accumulates wall time per phase from module hooks and wrapped callables."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._handles: list[Any] = []

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total[phase] += time.perf_counter() - t0
                self.calls[phase] += 1
        return timed

    def hook(self, phase: str, module: torch.nn.Module, count: bool = True) -> None:
        """Time `module`'s forward into `phase`; `count=False` for the 2nd..nth module of one phase."""
        starts: list[float] = []

        def pre(*_):
            starts.append(time.perf_counter())

        def post(*_):
            self.total[phase] += time.perf_counter() - starts.pop()
            self.calls[phase] += count
        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class TimedRunner:
    """Delegates to the real runner; times compute and skip apart and keeps one compute input."""

    def __init__(self, runner, clock: PhaseClock) -> None:
        self.runner, self.clock = runner, clock
        self.captured: tuple[torch.Tensor, Callable, torch.Tensor] | None = None

    @property
    def decisions(self):
        return self.runner.decisions

    def forward(self, index, x, run_blocks, expert="single", valid=None):
        t0 = time.perf_counter()
        out = self.runner.forward(index, x, run_blocks, expert=expert, valid=valid)
        dt = time.perf_counter() - t0
        phase = "blocks: skip path" if self.runner.decisions[-1].skip else "blocks: compute"
        self.clock.total[phase] += dt
        self.clock.calls[phase] += 1
        if self.captured is None and phase == "blocks: compute":
            self.captured = (x.clone(), run_blocks, (out - x).clone())
        return out


@contextlib.contextmanager
def instrumented(bench: Bench, clock: PhaseClock) -> Iterator[None]:
    """Hooks on the DiT's non-block modules, its whole forward, and the scheduler's step."""
    import launcher.wan.pipeline as pipeline_module

    for dit in bench.pipeline.m.experts.values():
        m, ce = dit.model, dit.model.condition_embedder
        clock.hook("embed: patch", m.patch_embedding)
        clock.hook("embed: rope", m.rope)
        for i, sub in enumerate((ce.timesteps_proj, ce.time_embedder, ce.act_fn, ce.time_proj)):
            clock.hook("embed: time", sub, count=i == 0)
        clock.hook("text embed (cached per branch)", ce.text_embedder)
        clock.hook("head: norm_out + proj_out", m.norm_out)
        clock.hook("head: norm_out + proj_out", m.proj_out, count=False)
        # the pipeline embeds once per step (shared by cond/uncond) and runs each branch from it
        dit.embed = clock.wrap("dit embed", dit.embed)
        dit.run = clock.wrap("dit run", dit.run)
    original = getattr(pipeline_module, "make_scheduler", None)

    def timed_scheduler(*a, **kw):
        sched = original(*a, **kw)
        sched.step = clock.wrap("scheduler step", sched.step)
        return sched
    patch = (mock.patch.object(pipeline_module, "make_scheduler", timed_scheduler) if original is not None
             else contextlib.nullcontext())
    try:
        with patch:
            yield
    finally:
        clock.remove()
        for dit in bench.pipeline.m.experts.values():
            del dit.embed, dit.run  # back to the class methods


def profile(bench: Bench) -> tuple[dict[str, Any], TimedRunner]:
    """One uncached and one cached generation with phase clocks; seconds per phase and per call."""
    out: dict[str, Any] = {}
    keep: TimedRunner | None = None
    for mode in ("uncached", "cached"):
        clock = PhaseClock()
        runner = TimedRunner(bench.uncached() if mode == "uncached" else bench.cached(), clock)
        with instrumented(bench, clock):
            result = bench.pipeline.generate(bench.request, runner)
        keep = runner if mode == "cached" else keep
        t = dict(clock.total)
        t["dit forward"] = t.pop("dit embed", 0.0) + t.pop("dit run", 0.0)
        clock.calls["dit forward"] = clock.calls["dit run"]
        denoise = result.timings["denoise"]
        blocks = t.get("blocks: compute", 0.0) + t.get("blocks: skip path", 0.0)
        named = sum(v for k, v in t.items() if k.startswith(("embed:", "head:")))
        rows = {k: {"s": t[k], "calls": clock.calls[k]} for k in sorted(t) if k != "dit forward"}
        rows["dit forward: rest (modulation, unpatchify, casts)"] = {
            "s": t["dit forward"] - blocks - named, "calls": clock.calls["dit forward"]}
        loop_named = t["dit forward"] + t.get("scheduler step", 0.0) + t.get("text embed (cached per branch)", 0.0)
        rows["loop: rest (CFG combine, cat, python)"] = {"s": denoise - loop_named, "calls": len(result.timesteps)}
        for r in rows.values():
            r["per_call_ms"] = 1e3 * r["s"] / r["calls"] if r["calls"] else 0.0
            r["share_of_denoise"] = r["s"] / denoise
        out[mode] = {"denoise_s": denoise, "phases": rows, "forwards": clock.calls["dit forward"],
                     "outside_blocks_s": denoise - blocks}
    u = out["uncached"]
    b = u["phases"]["blocks: compute"]["s"] / u["denoise_s"]
    fs = out["uncached"]["forwards"] / max(out["cached"]["phases"].get("blocks: compute", {"calls": 1})["calls"], 1)
    out["block_share_uncached"] = b
    # if skipped forwards cost nothing but their non-block work, this is the best efficiency possible
    out["efficiency_bound"] = 1.0 / (b + fs * (1.0 - b))
    assert keep is not None
    return out, keep


# -- microbenchmark: the skip path alone ----------------------------------------------------------
def _per_call(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def skip_microbench(captured: tuple[torch.Tensor, Callable, torch.Tensor], n_skip: int = 300,
                    n_compute: int = 3) -> dict[str, Any]:
    """Skip path (controller: decide + `x + residual`) vs one bare add vs the compute path, same tensors."""
    from magcache.controller import MagCacheController
    from magcache.schedule import MagCacheParams, MagCacheSchedule

    x, run_blocks, residual = captured
    steps = n_skip + 2

    def controller(always_compute: bool) -> MagCacheController:
        # forwards 0, 1 retained (they fill the residual cache); afterwards always skip (mag 1: no error)
        r = 1.0 if always_compute else 2.5 / (2 * steps)
        params = MagCacheParams(thresh=1.0, K=2 * steps, retention_ratio=r)
        return MagCacheController(MagCacheSchedule(mode="ti2v", steps=steps, split=0, mag=[1.0] * 2 * steps,
                                                   params=params))

    skip_ctrl = controller(False)
    skip_ctrl.forward(0, x, run_blocks)
    skip_ctrl.forward(1, x, run_blocks)
    index = iter(range(2, 2 * steps))
    with torch.no_grad():
        bare = _per_call(lambda: x + residual, n_skip)
        skip = _per_call(lambda: skip_ctrl.forward(next(index), x, run_blocks), n_skip // 2)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(10):
                skip_ctrl.forward(next(index), x, run_blocks)
        compute_ctrl = controller(True)
        cindex = iter(range(2 * steps))
        compute = _per_call(lambda: compute_ctrl.forward(next(cindex), x, run_blocks), n_compute)
    assert len(skip_ctrl.skipped) == len(skip_ctrl.decisions) - 2, "the microbenchmark schedule must skip"
    ops, alloc = {}, 0
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            ops[e.key] = e.count / 10
            alloc += max(e.self_cpu_memory_usage, 0)
    return {"tokens": x.shape[1], "dim": x.shape[2], "bare_add_us": bare * 1e6, "skip_path_us": skip * 1e6,
            "skip_overhead_us": (skip - bare) * 1e6, "compute_path_ms": compute * 1e3,
            "skip_over_compute": skip / compute, "ops_per_skip": ops,
            "suspect_ops": sorted(k for k in ops if k in SUSPECT_OPS),
            "bytes_allocated_per_skip": alloc / 10, "output_bytes": x.numel() * x.element_size()}


def forward_vs_diffusers(bench: Bench, repeats: int = 5) -> dict[str, Any]:
    """Our DiT forward (sub-modules called by `launcher.wan.dit`) against diffusers' own root forward,
    same weights and inputs, interleaved: ours must not be slower, and must give the same output."""
    from magcache.controller import ComputeAll

    from launcher.wan.dit import pad_context

    dit = next(iter(bench.pipeline.m.experts.values()))
    model = dit.model
    cfg = model.config
    from launcher.wan.conditioning import latent_shape

    g = torch.Generator().manual_seed(0)
    _, f, h, w = latent_shape(bench.cfg.task, bench.request.frame_num, bench.request.height, bench.request.width)
    latent = torch.randn(cfg.in_channels, f, h, w, generator=g)
    t = torch.tensor([700])
    ctx = pad_context(torch.randn(7, cfg.text_dim, generator=g), 512)
    with torch.no_grad():
        ours = dit.forward(latent, t, dit.embed_text(ctx), runner=ComputeAll(), index=0)
        theirs = model(latent[None], t, ctx, return_dict=False)[0][0]
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(repeats):
            for name, fn in (("ours", lambda: dit.forward(latent, t, dit.embed_text(ctx), runner=ComputeAll(), index=0)),
                             ("diffusers", lambda: model(latent[None], t, ctx, return_dict=False))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {"tokens": int(latent.shape[1] * latent.shape[2] * latent.shape[3] // 4), "ours_ms": o * 1e3,
            "diffusers_ms": d * 1e3, "ours_over_diffusers": o / d,
            "max_abs_diff": float((ours - theirs).abs().max()), "repeats": repeats}


# -- figures ------------------------------------------------------------------------------------
def figures(bench: Bench, uncached: list[Run], cached: list[Run]) -> dict[str, Any]:
    plan = bench.plan()
    total = uncached[0].computed
    computed = cached[0].computed
    fwd = total / computed
    du, dc = summarize([r.phases["denoise"] for r in uncached]), summarize([r.phases["denoise"] for r in cached])
    eu, ec = summarize([r.e2e_s for r in uncached]), summarize([r.e2e_s for r in cached])
    cu, cc = summarize([r.cpu_s for r in uncached]), summarize([r.cpu_s for r in cached])
    pairs = [u.phases["denoise"] / c.phases["denoise"] for u, c in zip(uncached, cached)]
    wall = du.median / dc.median
    ref = uncached[0].latents
    phases = {mode: {k: statistics.median(r.phases.get(k, 0.0) for r in runs) for k in uncached[0].phases}
              for mode, runs in (("uncached", uncached), ("cached", cached))}
    return {
        "forwards_total": total, "forwards_computed": computed, "forwards_skipped": total - computed,
        "forward_speedup": fwd, "plan_forward_speedup": plan.forward_speedup,
        "skips_match_plan": list(cached[0].skipped) == list(plan.skipped_forwards),
        "denoise_s": {"uncached": du.to_json(), "cached": dc.to_json()},
        "e2e_s": {"uncached": eu.to_json(), "cached": ec.to_json()},
        "cpu_to_last_step_s": {"uncached": cu.to_json(), "cached": cc.to_json()},
        "phase_medians_s": phases,
        "wall_speedup_denoise": wall, "wall_speedup_pairs": pairs,
        "efficiency": wall / fwd, "efficiency_pairs": [p / fwd for p in pairs],
        # noise on a shared machine only ever adds time, so the fastest runs are a second estimate
        "efficiency_best_runs": du.min / dc.min / fwd,
        "e2e_speedup": eu.median / ec.median, "cpu_speedup": cu.median / cc.median,
        "cpu_efficiency": cu.median / cc.median / fwd,
        "target_efficiency": TARGET_EFFICIENCY, "meets_target": wall / fwd >= TARGET_EFFICIENCY,
        "latent_rel_diff_cached_vs_uncached": float((cached[0].latents - ref).norm() / ref.norm()),
        "deterministic_repeats": all(torch.equal(r.latents, ref) for r in uncached)
        and all(torch.equal(r.latents, cached[0].latents) for r in cached),
    }


# -- markdown -----------------------------------------------------------------------------------
def _x(v: float) -> str:
    return f"{v:.2f}x"


def _load_note(machine: dict[str, Any]) -> str:
    """The 1-minute load other processes put on the machine just before the run started."""
    load = (machine.get("load_avg_at_start") or [None])[0]
    if load is None:
        return "load unknown"
    busy = load > 0.5 * machine["usable_cpus"]
    return f"load {load:.2f} before the run" + (" — **shared, busy machine: timings are noisy**" if busy else "")


def _header(rec: dict[str, Any]) -> str:
    fl, m, v, dit = rec["flags"], rec["machine"], rec["versions"], rec["checkpoint"]["dit"]
    code = v["magcache-launch"]
    return (f"### `{rec['name']}` — {fl['task']}, thresh {fl['thresh']} K {fl['K']} R {fl['retention']}, "
            f"{fl['steps']} steps\n\n"
            f"{rec['date']} · {m['cpu_model']} ({m['usable_cpus']} usable CPUs, {_load_note(m)}) · "
            f"torch.set_num_threads({fl['threads']}) · torch {v['torch']}, diffusers {v['diffusers']} · "
            f"commit {str(code['commit'])[:10]}{' (dirty)' if code['dirty'] else ''}\n\n"
            f"DiT {dit['dim']} dim x {dit['layers']} layers ({dit['params_per_expert_m']} M params, {dit['dtype']}), "
            f"{fl['size']} x {fl['frames']} frames = {rec['seq_len']} tokens; {fl['repeats']} interleaved repeats "
            f"after {fl['warmup']} warm-up pair(s); median (min–max).\n")


def _figures_table(f: dict[str, Any]) -> str:
    du, dc, eu, ec = (f["denoise_s"]["uncached"], f["denoise_s"]["cached"], f["e2e_s"]["uncached"],
                      f["e2e_s"]["cached"])
    pairs = f["efficiency_pairs"]
    cross = " / ".join(f"{f[k]:.3f}" if k in f else "—" for k in ("efficiency_best_runs", "cpu_efficiency"))
    return markdown_table(["", "uncached", "cached", "speedup"], [
        ["DiT forwards computed", f["forwards_total"], f["forwards_computed"],
         f"**{_x(f['forward_speedup'])}** (forward count)"],
        ["denoise loop", f"{du['median']:.2f} s ({du['min']:.2f}–{du['max']:.2f})",
         f"{dc['median']:.2f} s ({dc['min']:.2f}–{dc['max']:.2f})", f"**{_x(f['wall_speedup_denoise'])}** wall"],
        ["end to end (encode+denoise+decode)", f"{eu['median']:.2f} s", f"{ec['median']:.2f} s", _x(f["e2e_speedup"])],
        ["efficiency (wall / forward speedup)", "", "",
         f"**{f['efficiency']:.3f}** (pairs {min(pairs):.3f}–{max(pairs):.3f}; target {f['target_efficiency']})"],
        ["efficiency of the fastest runs / of CPU time (cross-checks)", "", "", cross],
    ])


def _microbench_text(mb: dict[str, Any]) -> str:
    ops = ", ".join(f"{k} x{v:g}" for k, v in sorted(mb["ops_per_skip"].items())) or "none"
    return (f"**Skip path alone** ({mb['tokens']} tokens x {mb['dim']}): controller skip "
            f"{mb['skip_path_us']:.1f} µs vs one bare `x + residual` {mb['bare_add_us']:.1f} µs "
            f"(decision overhead {mb['skip_overhead_us']:.1f} µs) vs compute path {mb['compute_path_ms']:.1f} ms "
            f"(skip = {mb['skip_over_compute']:.2e} of a compute). Aten ops per skip: {ops}; copies/syncs: "
            f"{', '.join(mb['suspect_ops']) or 'none'}; {mb['bytes_allocated_per_skip']:.0f} bytes allocated "
            f"(one output = {mb['output_bytes']} bytes).\n")


def _profile_text(pr: dict[str, Any]) -> str:
    names = list(pr["uncached"]["phases"])
    names += [k for k in pr["cached"]["phases"] if k not in names]
    rows = []
    for k in names:
        cells = [pr[mode]["phases"].get(k) for mode in ("uncached", "cached")]
        rows.append([k] + [f"{fmt_seconds(p['s'])} ({p['calls']} x {p['per_call_ms']:.2f} ms, "
                           f"{p['share_of_denoise']:.1%})" if p else "—" for p in cells])
    return (f"**Where the denoise time goes** (one profiled generation per mode, hooks on; total "
            f"{pr['uncached']['denoise_s']:.2f} s / {pr['cached']['denoise_s']:.2f} s): blocks are "
            f"{pr['block_share_uncached']:.1%} of the uncached loop, so even free skips cap the efficiency at "
            f"1 / (b + s(1 - b)) = **{pr['efficiency_bound']:.3f}** for this forward speedup.\n\n"
            + markdown_table(["phase", "uncached: total (calls x per call, share)", "cached"], rows, align="lll"))


def _noise_note(f: dict[str, Any]) -> str:
    """A warning when the repeats disagree more than the effect being measured (or beat physics)."""
    spread = max(f["denoise_s"]["uncached"]["spread_pct"], f["denoise_s"]["cached"]["spread_pct"])
    if spread <= NOISY_SPREAD_PCT and f["efficiency"] <= 1.0:
        return ""
    return (f"**Noisy run:** repeats spread by up to {spread:.0f}% of their median"
            + (f" and the efficiency exceeds 1 ({f['efficiency']:.3f}), which no skip can do" if f["efficiency"] > 1
               else "")
            + "; these wall-clock figures track the machine's load, not MagCache. Rerun on a quiet machine; the "
              "profile bound (a ratio within one run) and the skip-path microbenchmark below depend far less on it.")


def render(records: list[dict[str, Any]]) -> str:
    """The BENCHMARKS.md section: one block per result file, newest first; text only from the JSON."""
    if not records:
        return "_No results yet: run `python scripts/bench_magcache.py`._"
    parts = []
    for rec in records:
        f = rec["figures"]
        parts += [_header(rec), _figures_table(f)]
        noise = _noise_note(f)
        if noise:
            parts.append(f"\n{noise}")
        parts += [f"\nSkips match `magcache-launch plan`: {f['skips_match_plan']}; cached vs uncached latents "
                  f"differ by {f['latent_rel_diff_cached_vs_uncached']:.2%} (relative L2); repeats bit-identical: "
                  f"{f['deterministic_repeats']}.\n"]
        if rec.get("skip_microbench"):
            parts.append(_microbench_text(rec["skip_microbench"]))
        if rec.get("forward_vs_diffusers"):
            fv = rec["forward_vs_diffusers"]
            parts.append(f"\n**Our forward vs diffusers'** (same weights, {fv['tokens']} tokens, median of "
                         f"{fv['repeats']} interleaved): ours {fv['ours_ms']:.1f} ms, `WanTransformer3DModel.forward` "
                         f"{fv['diffusers_ms']:.1f} ms (ratio {fv['ours_over_diffusers']:.3f}); outputs differ by "
                         f"{fv['max_abs_diff']:.1e} at most.\n")
        if rec.get("profile"):
            parts.append(_profile_text(rec["profile"]))
        if not f["meets_target"]:
            parts.append(f"\n**Below the {f['target_efficiency']} target.** " + explain(rec))
        parts.append("")
    return "\n".join(parts)


def explain(rec: dict[str, Any]) -> str:
    """Why efficiency < target, in numbers from this record (no text is fixed in advance)."""
    f, pr, mb = rec["figures"], rec.get("profile"), rec.get("skip_microbench")
    bits = []
    if pr:
        bits.append(f"The work MagCache never skips (embedding, head, scheduler, CFG) is "
                    f"{1 - pr['block_share_uncached']:.1%} of the uncached loop, which bounds the efficiency at "
                    f"{pr['efficiency_bound']:.3f}.")
    if mb:
        bits.append(f"A skip costs {mb['skip_path_us']:.0f} µs, {mb['skip_over_compute']:.1e} of a computed forward.")
    spread = max(f["denoise_s"]["uncached"]["spread_pct"], f["denoise_s"]["cached"]["spread_pct"])
    bits.append(f"Repeats spread by up to {spread:.0f}% of the median (CPU-time efficiency "
                f"{f['cpu_efficiency']:.3f}); a spread larger than the gap to the target means the machine was busy.")
    return " ".join(bits)


def update_markdown(path: Path, results_dir: Path) -> None:
    replace_section(path, SECTION, render(load_results(BENCHMARK, results_dir)))


# -- main ---------------------------------------------------------------------------------------
def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="ti2v-5B", choices=("ti2v-5B", "t2v-A14B"),
                   help="text-only tasks; ti2v-5B has one expert, t2v-A14B two")
    p.add_argument("--ckpt-dir", type=Path, help="existing checkpoint (default: random --preset bench, temporary)")
    p.add_argument("--size", help="WIDTH*HEIGHT (default: 192 tokens with --frames 9: ti2v-5B 256*256, "
                                  "t2v-A14B 128*128)")
    p.add_argument("--frames", type=int, default=9, help="4n+1")
    p.add_argument("--steps", type=int, help="sampling steps (default: the task's, 50 / 40)")
    p.add_argument("--thresh", type=float, default=0.06, help="MagCache threshold (seed README setting E006)")
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--retention", type=float, default=0.2, help="retention ratio (t2v-A14B seed setting: 0.4)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed uncached+cached pairs first")
    p.add_argument("--threads", type=int, default=_usable_cpus(), help="torch.set_num_threads (default: usable CPUs)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prompt", default="a red fox runs through fresh snow at dawn, cinematic")
    p.add_argument("--no-profile", action="store_true", help="skip the phase profile and the skip microbenchmark")
    p.add_argument("--name", help="result file benchmarks/results/<name>.json (default: magcache-cpu-<task>)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--render-only", action="store_true", help="rebuild the BENCHMARKS.md section and exit")
    p.add_argument("--no-save", action="store_true", help="print the figures only (smoke runs)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    args.size = args.size or DEFAULT_SIZE[args.task]
    args.name = args.name or f"magcache-cpu-{args.task}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun.start(args, update_markdown)
    if run is None:
        return 0
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    log = run.log
    with tempfile.TemporaryDirectory(prefix="bench-magcache-") as tmp:
        ckpt = run.checkpoint(Path(tmp), args.task, lambda out: _make_checkpoint(args.task, out, seed=0))
        bench = load_bench(args, ckpt)
        args.steps = bench.cfg.sample_steps
        d = bench.checkpoint["dit"]
        log(f"{args.task}: DiT {d['dim']}x{d['layers']} ({d['params_per_expert_m']} M), {args.size} x {args.frames} "
            f"frames, {args.steps} steps, {args.threads} threads; plan speedup {bench.plan().forward_speedup:.2f}x")
        uncached, cached = interleaved(bench, args.repeats, args.warmup, log)
        figs = figures(bench, uncached, cached)
        sections: dict[str, Any] = {"checkpoint": bench.checkpoint, "seq_len": uncached[0].seq_len, "runs": {
            mode: [{"phases": r.phases, "e2e_s": r.e2e_s, "cpu_s": r.cpu_s} for r in runs]
            for mode, runs in (("uncached", uncached), ("cached", cached))}}
        if not args.no_profile:
            log("profiling one generation per mode (hooks on)")
            prof, timed = profile(bench)
            sections["profile"] = prof
            assert timed.captured is not None
            log("skip-path microbenchmark")
            sections["skip_microbench"] = skip_microbench(timed.captured)
            log("our DiT forward vs diffusers' WanTransformer3DModel.forward")
            sections["forward_vs_diffusers"] = forward_vs_diffusers(bench)
    record = run.record(benchmark=BENCHMARK, figures=figs, **sections)
    record["machine"]["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    log(f"forward speedup {figs['forward_speedup']:.2f}x | denoise wall speedup {figs['wall_speedup_denoise']:.2f}x | "
        f"efficiency {figs['efficiency']:.3f} (target {TARGET_EFFICIENCY}) | end to end {figs['e2e_speedup']:.2f}x")
    if "profile" in sections:
        mb = sections["skip_microbench"]
        log(f"blocks {sections['profile']['block_share_uncached']:.1%} of the uncached loop -> efficiency bound "
            f"{sections['profile']['efficiency_bound']:.3f}; skip path {mb['skip_path_us']:.1f} us vs bare add "
            f"{mb['bare_add_us']:.1f} us vs compute {mb['compute_path_ms']:.1f} ms")
    return run.save(record)


if __name__ == "__main__":
    sys.exit(main())
