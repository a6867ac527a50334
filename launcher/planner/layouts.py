"""Every way to split N GPUs for one task (dp x cfg x ring x ulysses, FSDP on or off), each priced by
the roofline model (`perf_model`), and the one to use.

The mesh order is (dp, cfg, ring, ulysses), Ulysses innermost: its all-to-alls, the heaviest
traffic, stay on contiguous ranks (one node), and ring point-to-point, which overlaps with
attention, takes the outer, inter-node dimension. A group stays inside a node when its span of
contiguous ranks divides the GPUs per node.

Memory per GPU: per phase (load, encode, denoise, decode) from `memory_model` (weights as the memory
policy places them, the block's activation peak on the rank's tokens, FSDP buffers, the VAE decode
split by rows over a generation's ranks); the largest phase plus a reserve must fit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.planner.memory import memory_policy
from launcher.planner.memory_model import phase_bytes, t5_bytes
from launcher.planner.perf_model import (
    DIMS,
    GB,
    GPUS,
    Calibration,
    DitDims,
    Efficiency,
    GpuSpec,
    RankLayout,
    Workload,
    block_flops,
    forward_cost,
    model_constants,
    predict,
)
from launcher.wan.tasks import TASKS
from magcache.plan import Plan



@dataclass(frozen=True, slots=True)
class Cluster:
    gpus: int
    gpu: GpuSpec
    gpu_key: str
    nodes: int
    gpus_per_node: int

    @classmethod
    def of(cls, gpus: int, gpu: str, nodes: int | None, gpus_per_node: int | None) -> Cluster:
        if gpus < 1:
            raise UsageError(f"--gpus {gpus}: give the number of GPUs to plan for (1 or more)")
        key = gpu.lower()
        if key not in GPUS:
            raise UsageError(f"--gpu {gpu}: unknown GPU; choose one of {', '.join(GPUS)}")
        if nodes is not None and nodes < 1 or gpus_per_node is not None and gpus_per_node < 1:
            raise UsageError("--nodes and --gpus-per-node must be 1 or more")
        if nodes is None and gpus_per_node is None and gpus > 8 and gpus % 8:
            raise UsageError(f"--gpus {gpus} spans more than one 8-GPU node unevenly: give --nodes M or "
                             "--gpus-per-node K")
        if gpus_per_node is None:
            gpus_per_node = gpus // nodes if nodes else min(gpus, 8)
        if nodes is None:
            nodes = -(-gpus // gpus_per_node)
        if nodes * gpus_per_node != gpus:
            raise UsageError(f"--gpus {gpus} is not --nodes {nodes} x --gpus-per-node {gpus_per_node}; "
                             "give the node count and GPUs per node that multiply to --gpus")
        return cls(gpus=gpus, gpu=GPUS[key], gpu_key=key, nodes=nodes, gpus_per_node=gpus_per_node)

    def link(self, span: int) -> str:
        """Where a group of `span` contiguous ranks communicates."""
        return "intra" if span <= 1 or self.gpus_per_node % span == 0 else "inter"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def step_pattern(the_plan: Plan, *, magcache: bool) -> list[tuple[bool, bool | None]]:
    """Per step: (cond computed, uncond computed / None where guidance 1 runs no uncond forward)."""
    steps: dict[int, dict[str, bool]] = {}
    for f in the_plan.forwards:
        steps.setdefault(f.step, {})[f.branch] = not (magcache and f.skip)
    return [(s["cond"], s.get("uncond")) for _, s in sorted(steps.items())]


def memory_gb(dims: DitDims, work: Workload, place: RankLayout, eff: Efficiency) -> dict[str, float]:
    """Peak GB per GPU by part (each at its own phase's peak); `total` is the largest phase + reserve."""
    phases = phase_bytes(dims, work, place)
    denoise, decode = phases["denoise-high"], phases["decode"]
    return {"weights_denoise": denoise["weights"] / GB, "t5": 0.0 if place.t5_offload else t5_bytes(dims, place) / GB,
            "activations": denoise["activations"] / GB, "fsdp_buffers": denoise["comm"] / GB,
            "vae_decode_peak": decode["activations"] / GB,
            "total": max(p["total"] for p in phases.values()) / GB + eff.reserve_gb}


def memory_phases_gb(dims: DitDims, work: Workload, place: RankLayout) -> dict[str, float]:
    """Device GB per phase (no reserve): what `plan --dry-run` measures, per phase."""
    return {k: v["total"] / GB for k, v in phase_bytes(dims, work, place).items()}


def with_memory_policy(place: RankLayout, *, world_size: int, offload_model: bool | None,
                       t5_cpu: bool = False) -> RankLayout:
    """The residency the launcher itself chooses for this layout (`planner.memory.memory_policy`, the
    official rules): one GPU offloads by default, and ranks without sequence parallelism or FSDP swap
    experts (only the active one on the GPU). `t5_cpu`: T5 lives and runs on the CPU (none on the GPU)."""
    pol = memory_policy(on_gpu=True, offload_model=offload_model, world_size=world_size, sp=place.sp,
                        dit_fsdp=place.dit_fsdp, t5_fsdp=place.dit_fsdp, t5_cpu=t5_cpu)
    return replace(place, offload=pol.swap_experts, t5_offload=pol.t5_home == "cpu",
                   park_dit_before_decode=pol.park_dit_before_decode, dit_load_gpu=pol.dit_load == "gpu",
                   t5_cpu=t5_cpu)


def layout_flags(place: RankLayout) -> str:
    parts = []
    if place.ulysses > 1:
        parts.append(f"--ulysses_size {place.ulysses}")
    if place.ring > 1:
        parts.append(f"--ring_size {place.ring}")
    if place.cfg == 2:
        parts.append("--cfg-parallel")
    if place.dit_fsdp:
        parts.append("--dit_fsdp --t5_fsdp")
    if place.offload_flag:
        parts.append("--offload_model True")
    return " ".join(parts) or "(one GPU, no parallel flags)"


def _r(x: float, nd: int = 2) -> float:
    return round(x, nd)


def evaluate(cluster: Cluster, task: str, work: Workload, place: RankLayout, dp: int, eff: Efficiency,
             plain: list[tuple[bool, bool | None]], cached: list[tuple[bool, bool | None]],
             calibration: Calibration | None, *, offload_model: bool | None = None,
             t5_cpu: bool = False) -> dict[str, Any]:
    dims = DIMS[task]
    place = with_memory_policy(place, world_size=cluster.gpus, offload_model=offload_model, t5_cpu=t5_cpu)
    mem = memory_gb(dims, work, place, eff)
    if not place.offload and not place.dit_fsdp and dims.experts == 2 and mem["total"] > cluster.gpu.memory_gb:
        # both experts do not fit: --offload_model True keeps only the active one on the GPU
        place = replace(with_memory_policy(place, world_size=cluster.gpus, offload_model=True, t5_cpu=t5_cpu),
                        offload_flag=True)
        mem = memory_gb(dims, work, place, eff)
    fwd = forward_cost(dims, work, place, cluster.gpu, eff, calibration)
    per_step = 1 if place.cfg == 2 else 2
    without = predict(dims, work, place, cluster.gpu, eff, plain, calibration)
    with_mc = predict(dims, work, place, cluster.gpu, eff, cached, calibration)
    return {
        "gpus": cluster.gpus, "ranks_per_video": place.sp * place.cfg,
        "ulysses": place.ulysses, "ring": place.ring, "cfg": place.cfg, "dp": dp,
        "dit_fsdp": place.dit_fsdp, "offload": place.offload, "flags": layout_flags(place),
        "memory_gb_per_gpu": _r(mem["total"], 1),
        "memory_gb": {k: _r(v) for k, v in mem.items() if k != "total"},
        "memory_gb_by_phase": {k: _r(v) for k, v in memory_phases_gb(dims, work, place).items()},
        "fits": mem["total"] <= cluster.gpu.memory_gb,
        "comm_per_step_gb": {"ulysses_all_to_all": _r(per_step * fwd.comm.ulysses_a2a_bytes / GB),
                             "ring_p2p": _r(per_step * fwd.comm.ring_p2p_bytes / GB),
                             "fsdp_all_gather": _r(per_step * fwd.comm.fsdp_allgather_bytes / GB)},
        "links": {"ulysses": place.ulysses_link, "ring": place.ring_link, "cfg": place.cfg_link,
                  "fsdp": place.fsdp_link},
        "predicted": {"kind": "model", "step_s": _r(without.step_s), "denoise_s": _r(without.denoise_s, 1),
                      "total_s": _r(without.total_s, 1),
                      "fixed_s": {k: _r(v) for k, v in without.fixed_s.items()},
                      "exposed_comm_s_per_forward": _r(fwd.comm.exposed_s, 3),
                      "videos_per_hour": _r(dp * 3600 / without.total_s, 1),
                      "magcache": {"denoise_s": _r(with_mc.denoise_s, 1), "total_s": _r(with_mc.total_s, 1)}},
    }


def enumerate_layouts(cluster: Cluster, task: str, work: Workload, the_plan: Plan, eff: Efficiency,
                      calibration: Calibration | None = None, vae_parallel: bool = True, *, quant: str = "none",
                      offload_model: bool | None = None, t5_cpu: bool = False,
                      convert_model_dtype: bool = False) -> list[dict[str, Any]]:
    """Every valid (dp, cfg, ring, ulysses, dit_fsdp) for the cluster, priced."""
    dims = DIMS[task]
    plain, cached = step_pattern(the_plan, magcache=False), step_pattern(the_plan, magcache=True)
    # generate refuses --cfg-parallel when any expert runs at guidance 1 (its steps have no uncond)
    cfg_ok = all(u is not None for _, u in plain)
    out = []
    for dp in divisors(cluster.gpus):
        gen = cluster.gpus // dp
        for cfg in (1, 2):
            if gen % cfg or (cfg == 2 and not cfg_ok):
                continue
            sp = gen // cfg
            for u in divisors(sp):
                if dims.heads % u:
                    continue
                r = sp // u
                for fsdp in ((False, True) if sp > 1 else (False,)):
                    place = RankLayout(ulysses=u, ring=r, cfg=cfg, dit_fsdp=fsdp, offload=False,
                                      ulysses_link=cluster.link(u), ring_link=cluster.link(u * r),
                                      cfg_link=cluster.link(sp * cfg), fsdp_link=cluster.link(sp),
                                      vae_parallel=vae_parallel, quant=quant,
                                      convert_model_dtype=convert_model_dtype)
                    out.append(evaluate(cluster, task, work, place, dp, eff, plain, cached, calibration,
                                        offload_model=offload_model, t5_cpu=t5_cpu))
    return out


#: predicted totals within this fraction of the fastest count as a tie (the model is not that precise)
TIE = 0.02


def _crosses(lay: dict[str, Any]) -> list[str]:
    """The layout's groups whose traffic crosses nodes."""
    active = {"ulysses": lay["ulysses"] > 1, "ring": lay["ring"] > 1, "cfg": lay["cfg"] > 1, "fsdp": lay["dit_fsdp"]}
    return [k for k, link in lay["links"].items() if active[k] and link == "inter"]


def recommend(layouts: list[dict[str, Any]], *, magcache: bool) -> tuple[int | None, str]:
    """Index of the fastest layout for one video that fits (ties: less traffic off the node), and why."""
    key = "magcache" if magcache else None

    def total(lay: dict[str, Any]) -> float:
        return lay["predicted"][key]["total_s"] if key else lay["predicted"]["total_s"]

    fitting = [i for i, lay in enumerate(layouts) if lay["fits"]]
    if not fitting:
        return None, "no layout fits in GPU memory: more GPUs, a larger GPU, or a smaller --size"
    fastest = min(total(layouts[i]) for i in fitting)
    # within TIE of the fastest the model cannot tell layouts apart: prefer on-node traffic, then headroom
    ranked = sorted(fitting, key=lambda i: (total(layouts[i]) > fastest * (1 + TIE), _crosses(layouts[i]) != [],
                                            layouts[i]["memory_gb_per_gpu"], total(layouts[i])))
    best = layouts[ranked[0]]
    crosses = _crosses(best)
    where = f"{', '.join(crosses)} across nodes" if crosses else "all traffic inside a node"
    reason = (f"{best['flags']}: {total(best):.0f} s predicted end-to-end{' with MagCache' if magcache else ''} "
              f"(model), within {TIE:.0%} of the fastest of {len(fitting)} layouts that fit; of those, "
              f"on-node traffic first, then the most memory headroom ({best['memory_gb_per_gpu']:.0f} GB/GPU); "
              f"{where}")
    if len(ranked) > 1:
        nxt = layouts[min(ranked[1:], key=lambda i: total(layouts[i]))]  # the runner-up on time alone
        reason += f"; next fastest: {nxt['flags']} at {total(nxt):.0f} s"
    return ranked[0], reason


def load_calibration(path: Path, gpu: GpuSpec, eff: Efficiency) -> Calibration:
    """Scale factors from a `scripts/gpu_check.py` result (S4: measured ms per A14B block)."""
    try:
        record = json.loads(path.read_text())
        s4 = record["figures"]["S4"]["figures"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--calibration {path}: not a gpu_check.py result with an S4 step ({type(e).__name__}); "
                         "pass benchmarks/results/gpu-<device>.json written by scripts/gpu_check.py") from None
    dims = DIMS["t2v-A14B"]
    if s4.get("dim") != dims.dim or s4.get("ffn") != dims.ffn:
        raise UsageError(f"--calibration {path}: S4 was measured at dim {s4.get('dim')}, ffn {s4.get('ffn')}, "
                         "not the A14B block (5120, 13824): use a result from a real GPU run, not --rehearse")
    points = tuple(sorted((int(v["tokens"]), float(v["ours_ms_per_block"])) for v in s4.values()
                          if isinstance(v, dict) and "tokens" in v and "ours_ms_per_block" in v))
    if not points:
        raise UsageError(f"--calibration {path}: its S4 step has no ours_ms_per_block figure; rerun gpu_check.py")
    peak = gpu.bf16_tflops * 1e12
    work_one = Workload("t2v-A14B", 0, 0, 0, 0, 0, "2.1", False)

    def roofline(tokens: int) -> tuple[float, float]:
        _, attn = block_flops(dims, tokens)
        place = RankLayout(1, 1, 1, False, False, "intra", "intra", "intra", "intra")
        cost = forward_cost(dims, replace(work_one, tokens=tokens), place, gpu, eff).compute_s / dims.layers
        attn_s = attn / (peak * eff.attention)
        return cost - attn_s, attn_s  # (linear + element-wise, attention) seconds per block

    rows = [(*roofline(t), ms / 1e3) for t, ms in points]
    a = b = sum(m for *_, m in rows) / sum(x + y for x, y, _ in rows)  # one scale: least total error
    if len(rows) >= 2:
        (x1, y1, m1), (x2, y2, m2) = rows[0], rows[-1]
        det = x1 * y2 - x2 * y1
        if abs(det) > 0:
            a2, b2 = (m1 * y2 - m2 * y1) / det, (x1 * m2 - x2 * m1) / det
            if a2 > 0 and b2 > 0:
                a, b = a2, b2
    device = record["figures"].get("S0", {}).get("figures", {}).get("name") if isinstance(record["figures"], dict) else None
    return Calibration(source=str(path), linear_scale=a, attention_scale=b, points=points, device=device)


def given_layout(layouts: list[dict[str, Any]], *, ulysses: int, ring: int, cfg: int, dit_fsdp: bool) -> int | None:
    """The index of the layout the command line's own parallel flags describe (dp: the spare ranks)."""
    for i, lay in enumerate(layouts):
        if (lay["ulysses"], lay["ring"], lay["cfg"], lay["dit_fsdp"]) == (ulysses, ring, cfg, dit_fsdp):
            return i
    return None


def plan_layouts(*, task: str, width: int, height: int, frames: int, the_plan: Plan, gpus: int, gpu: str,
                 nodes: int | None, gpus_per_node: int | None, calibration_file: Path | None,
                 magcache: bool, given: dict[str, Any] | None = None, vae_parallel: bool = True,
                 quant: str = "none", offload_model: bool | None = None, t5_cpu: bool = False,
                 convert_model_dtype: bool = False) -> dict[str, Any]:
    """`plan --gpus N`: {"layouts", "recommended", "reason", "given", "model"}; every figure a model's.
    `given`: the command line's ulysses, ring, cfg, dit_fsdp, whose layout is marked (None if invalid)."""
    if frames < 1 or (frames - 1) % 4:
        raise UsageError(f"--frame_num {frames}: must be 4n+1 (1, 5, 9, ..., 81)")
    cluster = Cluster.of(gpus, gpu, nodes, gpus_per_node)
    eff = Efficiency()
    calibration = None if calibration_file is None else load_calibration(calibration_file, cluster.gpu, eff)
    work = Workload.of(TASKS[task], width, height, frames)
    try:
        cluster.gpu.gemm_factor(quant)
    except ValueError as e:
        raise UsageError(f"--quantize {quant}: {e}; use --quantize int8") from None
    layouts = enumerate_layouts(cluster, task, work, the_plan, eff, calibration, vae_parallel, quant=quant,
                                offload_model=offload_model, t5_cpu=t5_cpu, convert_model_dtype=convert_model_dtype)
    best, reason = recommend(layouts, magcache=magcache)
    model = model_constants(cluster.gpu, eff, calibration)
    model.update({"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                  "workload": asdict(work), "dims": asdict(DIMS[task]), "quantize": quant,
                  "gemm_factor": cluster.gpu.gemm_factor(quant)})
    mine = None if given is None else given_layout(layouts, **given)
    return {"layouts": layouts, "recommended": best, "reason": reason, "given": mine, "model": model}
