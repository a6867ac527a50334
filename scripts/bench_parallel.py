#!/usr/bin/env python
"""Multi-rank launch on CPU/gloo: collectives per DiT forward, MagCache sync cost, per-rank host memory.

    python scripts/bench_parallel.py                      # 1, 2, 4 ranks (+ --dit_fsdp), ~3-5 min on 2 cores
    python scripts/bench_parallel.py --worlds 1,2 --steps 4 --generations 1 --no-save   # smoke run
    python scripts/bench_parallel.py --render-only        # BENCHMARKS.md from the stored JSON

Builds a random `--preset bench` t2v-A14B checkpoint (two 512-dim, 12-layer DiT experts of ~53 M
params; tiny T5/VAE) and runs `benchmarks/parallel_job.py` under real `torchrun --standalone` jobs
(gloo, `--ulysses_size` = world, one thread per rank) for each layout: 1 rank; N ranks; N ranks with
`--dit_fsdp`. Each job generates twice (a warm-up, then the measured one) through the product's own
`start_world` + `GenerationSession`, with MagCache on, and reports per rank:

- every torch.distributed call by kind, phase and DiT forward (payload bytes = what this rank hands
  to the collective), checked against a dispatcher-level count of c10d ops and against the formulas
  printed below (Ulysses all-to-all, output gather, FSDP2 block all-gather, MagCache sync);
- the MagCache decision sync (agree_min all-reduce): calls, seconds, share of the denoise loop;
- host memory: RSS before loading (the fixed overhead: torch, libraries, gloo), peak while loading,
  peak while generating, the DiT bytes the rank holds (exact, from its tensors) and PSS.

Counts, bytes and held DiT bytes do not depend on machine load; seconds and RSS peaks do (a little).
Writes `benchmarks/results/<name>.json` and the `parallel` section of BENCHMARKS.md.
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
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    BENCHMARKS_MD, BenchRun, RESULTS_DIR, load_results, markdown_table, replace_section,
)

BENCHMARK = "parallel-cpu"
SECTION = "parallel"
JOB = ROOT / "benchmarks" / "parallel_job.py"
TASK = "t2v-A14B"
MiB = 2**20
#: glibc's default mmap threshold grows after each large free, so FSDP's per-block all-gather buffers
#: end up cached on the heap and the RSS peak tracks the allocator, not live tensors; a fixed threshold
#: returns them at free (one comparison job keeps the default to show the difference)
MMAP_THRESHOLD = 1 << 20
ABORT = "terminate called"
ELEM = 4  # float32 on CPU (RunConfig's compute dtype without a GPU)
#: bytes per element of the Ulysses all-to-all and the FSDP2 all-gather for each compute dtype: q, k, v
#: travel in the autocast dtype and FSDP2 gathers in it (MixedPrecisionPolicy); the head output is float32
EXCHANGE_ELEM = {"float32": 4, "bfloat16": 2}


# -- running the jobs ---------------------------------------------------------------------------
def _make_checkpoint(out: Path) -> None:
    from launcher.checkpoint.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(TASK, "official", out, seed=0, preset="bench")


def layouts(worlds: list[int], malloc_compare: bool) -> list[dict[str, Any]]:
    out = []
    for n in worlds:
        out.append({"name": f"{n} rank{'s' if n > 1 else ''}", "world": n, "fsdp": False, "malloc": "fixed"})
        if n > 1:
            out.append({"name": f"{n} ranks --dit_fsdp", "world": n, "fsdp": True, "malloc": "fixed"})
    if any(n > 1 for n in worlds):  # the exchanges in bf16: half the bytes of float32
        n = max(worlds)
        for m in sorted({w for w in worlds if w > 1}):  # ring 2 (x Ulysses m/2): point-to-point k/v blocks
            ring_name = f"{m} ranks ring 2" + (f" x ulysses {m // 2}" if m > 2 else "") + " --dit_fsdp"
            out.append({"name": ring_name, "world": m, "fsdp": True, "malloc": "fixed", "ring": 2})
        out.append({"name": f"{n} ranks --dit_fsdp --dtype bfloat16", "world": n, "fsdp": True, "malloc": "fixed",
                    "dtype": "bfloat16"})
    if malloc_compare and any(n > 1 for n in worlds):
        n = 2 if 2 in worlds else max(worlds)
        out.append({"name": f"{n} ranks --dit_fsdp, glibc default malloc", "world": n, "fsdp": True,
                    "malloc": "default"})
    return out


def run_layout(layout: dict[str, Any], ckpt: Path, work: Path, args: argparse.Namespace,
               log) -> tuple[list[dict[str, Any]], float]:
    dtype = layout.get("dtype", "float32")
    out = work / f"job-{layout['world']}-{int(layout['fsdp'])}-{layout['malloc']}-{dtype}-r{layout.get('ring', 1)}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                        "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if layout["malloc"] == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout['world']}",
           str(JOB), "--ckpt", str(ckpt), "--out", str(out), "--task", TASK, "--size", args.size,
           "--frames", str(args.frames), "--steps", str(args.steps), "--thresh", str(args.thresh),
           "--K", str(args.K), "--retention", str(args.retention), "--generations", str(args.generations),
           "--warmup-steps", str(args.warmup_steps),
           "--threads", str(args.threads), "--dtype", dtype, "--ring", str(layout.get("ring", 1)),
           *(["--dit-fsdp"] if layout["fsdp"] else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.job_timeout)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    if proc.returncode != 0 or ABORT in text or len(ranks) != layout["world"]:
        raise RuntimeError(f"{layout['name']}: torchrun exit {proc.returncode}, {len(ranks)} rank file(s)"
                           f"{', gloo abort at exit' if ABORT in text else ''}\n{text[-3000:]}")
    if "still referenced at interpreter exit" in text:
        log(f"  warning: {layout['name']}: a process group outlived shutdown (see the job's teardown note)")
    return sorted(ranks, key=lambda r: r["rank"]), wall


# -- formulas -----------------------------------------------------------------------------------
def model_facts(ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Shapes the formulas need, from the checkpoint config and the request (no weights)."""
    from launcher.wan import conditioning as cond
    from launcher.checkpoint import inspect_checkpoint
    from launcher.config import parse_size
    from launcher.wan.tasks import TASKS

    task = TASKS[TASK]
    info = inspect_checkpoint(ckpt, task)
    c = next(iter(info.transformer_configs.values()))
    width, height = parse_size(args.size, task)
    _, f, h, w = cond.latent_shape(task, args.frames, height, width)
    patch = tuple(c["patch_size"])
    shapes = next(iter(info.transformer_weights.values())).shapes
    block_params = [[int(shape[0]), int(math.prod(shape[1:]))] for key, shape in shapes.items()
                    if key.startswith("blocks.") and len(shape) >= 1]
    return {"block_params": block_params,"heads": c["num_attention_heads"], "head_dim": c["attention_head_dim"], "layers": c["num_layers"],
            "dim": c["num_attention_heads"] * c["attention_head_dim"], "ffn_dim": c["ffn_dim"],
            "out_per_token": c["out_channels"] * patch[0] * patch[1] * patch[2],
            "seq_len": cond.seq_len(f, h, w, patch, 1), "experts": len(info.transformer_configs)}


def formulas(m: dict[str, Any], n: int, fsdp: bool, dtype: str = "float32", ring: int = 1) -> dict[str, Any]:
    """Per rank, per DiT forward, B = 1; exchanges in `dtype`'s bytes, the head output in float32.

    n = ring x ulysses ranks. The Ulysses all-to-all runs in the ulysses group on the same S/n-token
    shard (its bytes do not depend on the split); the ring then passes R-1 k/v blocks of
    (S/R tokens x H/U heads) = S/n x H elements each, k and v in one message.
    """
    elem = EXCHANGE_ELEM[dtype]
    s_pad = -(-m["seq_len"] // n) * n
    local = s_pad // n
    uly = n // ring
    a2a = m["layers"] * (3 + 1) * local * m["heads"] * m["head_dim"] * elem if uly > 1 else 0
    out = {
        "s_padded": s_pad,
        "ring": ring,
        "ring_calls": m["layers"] * (ring - 1),
        "ring_payload": m["layers"] * (ring - 1) * 2 * local * m["heads"] * m["head_dim"] * elem,
        "a2a_calls": 2 * m["layers"] if uly > 1 else 0,
        "a2a_payload": a2a, "a2a_off_rank": a2a * (n - 1) // n,
        "gather_calls": 1 if n > 1 else 0,
        "gather_payload": local * m["out_per_token"] * ELEM if n > 1 else 0,
        "sync_calls_per_non_retained": 1 if n > 1 else 0,
    }
    if fsdp:  # FSDP2 pads every rank's dim-0 shard to ceil(rows / N) rows for the all-gather
        shard = sum(-(-rows // n) * rest for rows, rest in m["block_params"]) * elem
        out.update(fsdp_calls=m["layers"], fsdp_payload=shard, fsdp_gathered=shard * n)
    return out


FORMULA_TEXT = (
    "Per rank and DiT forward (B = 1, float32 (4 bytes; the bf16 layout: 2 bytes per exchanged element), N ranks, S tokens padded to a multiple of N, H heads of D, "
    "L layers): the Ulysses exchange is one all-to-all of packed q,k,v [B, S/N, 3H, D] and one back "
    "[B, S/N, H, D] per self-attention, so a computed forward hands over **4·L·B·(S/N)·H·D·4 bytes** in "
    "**2·L all-to-alls**, (N−1)/N of which leave the rank; every forward (computed or skipped) gathers the "
    "head output once (all_gather of B·(S/N)·C_out·p_t·p_h·p_w·4 bytes); each non-retained forward adds one "
    "4-byte MagCache all-reduce; with `--dit_fsdp` each computed forward all-gathers every block once "
    "(L calls, payload = this rank's block shards, output = N x that). With ring R x Ulysses U (N = R·U; the "
    "all-to-alls run in the U group, none when U = 1), each self-attention passes R−1 k/v blocks to the next "
    "ring rank: **L·(R−1) batch_isend_irecv** per computed forward sending **L·(R−1)·2·(S/N)·H·D·4 bytes**."
)


# -- analysis -----------------------------------------------------------------------------------
def per_forward(rank: dict[str, Any], generation: int) -> dict[str, Any]:
    """Collectives of each DiT forward of one generation, grouped by computed / skipped."""
    decisions = {i: (retained, skip) for i, retained, skip in rank["decisions"][generation]}
    fwd: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    outside: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for gen, phase, index, kind, _size, payload, _s in rank["records"]:
        if gen != generation or phase != "denoise":
            continue
        target = fwd[index] if index is not None else outside
        target[kind][0] += 1
        target[kind][1] += payload
    groups: dict[str, dict[str, Any]] = {}
    for label, want in (("computed", False), ("skipped", True)):
        idx = [i for i, (_, skip) in decisions.items() if skip == want]
        kinds = sorted({k for i in idx for k in fwd[i]})
        per_kind = {}
        for k in kinds:
            calls = [fwd[i][k][0] for i in idx]
            payloads = [fwd[i][k][1] for i in idx]
            per_kind[k] = {"calls_min": min(calls), "calls_max": max(calls), "payload_min": min(payloads),
                           "payload_max": max(payloads)}
        groups[label] = {"forwards": len(idx), "kinds": per_kind}
    retained_computed = [i for i, (r, s) in decisions.items() if r]
    groups["computed"]["retained"] = len(retained_computed)
    groups["outside_forwards"] = {k: {"calls": v[0], "payload": v[1]} for k, v in outside.items()}
    return groups


def phase_totals(rank: dict[str, Any], generation: int | None) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))
    for gen, phase, _i, kind, _size, payload, seconds in rank["records"]:
        if gen == generation:
            out[phase][kind][0] += 1
            out[phase][kind][1] += payload
            out[phase][kind][2] += seconds
    return {p: dict(k) for p, k in out.items()}


def held_bytes(rank: dict[str, Any]) -> dict[str, int]:
    tot = {"held": 0, "expected": 0, "full": 0, "blocks_held_one_expert": 0}
    for e in rank["dit_bytes"].values():
        for key in ("held", "expected", "full"):
            tot[key] += e[key]["blocks"] + e[key]["root"]
    first = next(iter(rank["dit_bytes"].values()))
    tot["blocks_held_one_expert"] = first["held"]["blocks"]
    tot["root_one_expert"] = first["held"]["root"]
    tot["blocks_full_one_expert"] = first["full"]["blocks"]
    return tot


def analyse(layout: dict[str, Any], ranks: list[dict[str, Any]], facts: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    n = layout["world"]
    g = args.generations - 1  # the measured generation (0 is the warm-up when there are two)
    r0 = ranks[0]
    held = held_bytes(r0)
    fw = per_forward(r0, g)
    expect = formulas(facts, n, r0["fsdp_active"], layout.get("dtype", "float32"), layout.get("ring", 1))
    comp = fw["computed"]["kinds"]
    measured_a2a = comp.get("all_to_all_single", {}).get("payload_max", 0)
    fsdp_ok = (not r0["fsdp_active"]) or (comp.get("all_gather_single", {}).get("payload_max") == expect["fsdp_payload"]
                                          and comp["all_gather_single"]["calls_max"] == expect["fsdp_calls"])
    same_decisions = all(r["decisions"][g] == r0["decisions"][g] for r in ranks)
    counts_by_gen = [[(k, v["calls_min"], v["calls_max"], v["payload_max"]) for k, v in
                      sorted(per_forward(r0, i)["computed"]["kinds"].items())] for i in range(args.generations)]
    # dispatcher cross-check: c10d ops seen in generation 0's denoise (+ decode) vs wrapper records there
    # (a batch_isend_irecv is one wrapped call running one c10d op per P2POp: ring 2, VAE halo 2 or 4)
    window = ("denoise", "decode")
    wrapped0 = sum(1 for gen, phase, _i, kind, *_ in r0["records"]
                   if gen == 0 and phase in window and kind != "batch_isend_irecv")
    wrapped0 += sum(n for gen, phase, n in r0.get("p2p_ops", []) if gen == 0 and phase in window)
    dispatched0 = sum(r0["c10d_ops_denoise_gen0"].values())
    denoise_s = [r["clock"].get(f"{g}:denoise", 0.0) for r in ranks]
    sync_s = [r["sync"]["seconds"][g] for r in ranks]
    sync_calls = r0["sync"]["calls"][g]
    for r in ranks:  # what the loop would lose if each agreement cost only its back-to-back latency
        b2b = (r["sync_back_to_back_us"] or {}).get("median_us", 0.0)
        r["_intrinsic_share"] = b2b * 1e-6 * r["sync"]["calls"][g] / max(r["clock"].get(f"{g}:denoise", 1e-9), 1e-9)
    comm_s = [sum(v[2] for v in phase_totals(r, g).get("denoise", {}).values()) for r in ranks]
    mem = []
    for r in ranks:
        m = r["mem"]
        gen = m["generations"][g]
        mem.append({
            "rank": r["rank"],
            "rss_before_load_mb": m["before_load"]["VmRSS"],
            "pss_before_load_mb": m["before_load"].get("Pss"),
            "anon_before_load_mb": m["before_load"].get("RssAnon"),
            "load_peak_pss_mb": m.get("load_peak_pss", {}).get("Pss"),
            "generate_peak_pss_mb": gen.get("peak_pss", {}).get("Pss"),
            "load_peak_mb": m["after_load"]["VmHWM"] if r["peak_reset"] else None,
            "after_load": {k: m["after_load"].get(k) for k in ("VmRSS", "RssAnon", "RssFile", "Pss")},
            "generate_peak_mb": gen["end"]["VmHWM"] if r["peak_reset"] else None,
            "generate_peak_composition": {k: gen["peak_sample"].get(k) for k in ("VmRSS", "RssAnon", "RssFile")},
            "after_generate": {k: gen["end"].get(k) for k in ("VmRSS", "RssAnon", "RssFile", "Pss", "Pss_Anon",
                                                               "Pss_File")},
            "after_generate_trimmed_anon_mb": (m.get("after_generate_trimmed") or {}).get("RssAnon"),
            "dit_held_mb": held_bytes(r)["held"] / MiB, "dit_expected_mb": held_bytes(r)["expected"] / MiB,
            "fsdp_unsharded_groups_after_generate": r["fsdp_unsharded_groups_after_generate"],
        })
    return {
        "layout": layout, "world": n, "mesh": r0["mesh"], "fsdp_active": r0["fsdp_active"],
        "forwards": len(r0["decisions"][g]), "computed": fw["computed"]["forwards"], "skipped": fw["skipped"]["forwards"],
        "retained": fw["computed"]["retained"], "decisions_equal_across_ranks": same_decisions,
        "per_forward": fw, "formula": expect,
        "a2a_matches_formula": measured_a2a == expect["a2a_payload"]
        and fw["computed"]["kinds"].get("all_to_all_single", {}).get("calls_max", 0) == expect["a2a_calls"],
        "fsdp_matches_formula": fsdp_ok,
        "ring_matches_formula": all(comp.get("batch_isend_irecv", {}).get(k, 0) == expect[f]
                                    for k, f in (("calls_min", "ring_calls"), ("calls_max", "ring_calls"),
                                                 ("payload_min", "ring_payload"), ("payload_max", "ring_payload")))
        and "batch_isend_irecv" not in fw["skipped"]["kinds"],
        "gather_matches_formula": comp.get("all_gather", {}).get("payload_max", 0) == expect["gather_payload"],
        "counts_equal_across_generations": all(c == counts_by_gen[0] for c in counts_by_gen),
        "dispatcher_check": {"wrapped_calls_gen0": wrapped0, "c10d_ops_gen0": dispatched0,
                             "ops": r0["c10d_ops_denoise_gen0"], "equal": wrapped0 == dispatched0},
        "phases_rank0": {"setup": phase_totals(r0, None), "measured_generation": phase_totals(r0, g)},
        "timing": {
            "denoise_s_per_rank": denoise_s, "denoise_s_per_step": max(denoise_s) / args.steps,
            "load_s_rank0": r0["load_s"], "comm_share_of_denoise": max(c / d for c, d in zip(comm_s, denoise_s)),
            "sync_calls": sync_calls, "sync_s_per_rank": sync_s,
            "sync_us_per_call": 1e6 * max(sync_s) / sync_calls if sync_calls else 0.0,
            "sync_share_of_denoise": max(s / d for s, d in zip(sync_s, denoise_s)),
            "sync_intrinsic_share_of_denoise": max(r["_intrinsic_share"] for r in ranks),
            "sync_back_to_back_us": max((r["sync_back_to_back_us"] or {}).get("median_us", 0.0) for r in ranks),
        },
        "memory": mem, "dit_bytes_rank0": held,
    }


# -- rendering ----------------------------------------------------------------------------------
def _mib(b: float) -> str:
    return f"{b / MiB:.2f}"


def _calls(kinds: dict[str, Any], kind: str) -> tuple[int, int]:
    k = kinds.get(kind)
    return (k["calls_max"], k["payload_max"]) if k else (0, 0)


def render(records: list[dict[str, Any]]) -> str:
    if not records:
        return "_Not measured yet: `scripts/bench_parallel.py` fills this section._"
    parts = ["```bash\n. .venv/bin/activate\npython scripts/bench_parallel.py          # 1, 2, 4 ranks (+ --dit_fsdp); "
             "about 5 min on 2 busy cores\npython scripts/bench_parallel.py --render-only   # this section from "
             "benchmarks/results/parallel-*.json\n```\n"]
    for rec in records:
        f, m = rec["figures"], rec["model"]
        mach, v = rec["machine"], rec["versions"]
        rows = f["layouts"]
        commit = (v.get("magcache-launch") or {}).get("commit") or "?"
        dirty = " (dirty)" if (v.get("magcache-launch") or {}).get("dirty") else ""
        parts.append(
            f"### `{rec['name']}` — {TASK}, {rec['flags']['steps']} steps, {rec['flags']['size']} x "
            f"{rec['flags']['frames']} frames = {m['seq_len']} tokens\n\n"
            f"{rec['date']} · {mach['cpu_model']} ({mach['usable_cpus']} usable CPUs, load "
            f"{mach.get('load_avg_at_start', ['?'])[0]} before the run) · {rec['flags']['threads']} thread(s) per rank · "
            f"gloo · torch {v.get('torch')}, diffusers {v.get('diffusers')} · commit {commit[:10]}{dirty} · "
            f"total {rec['total_runtime_s']:.0f} s\n\n"
            f"DiT: 2 experts x {m['layers']} layers, dim {m['dim']} ({m['heads']} heads x {m['head_dim']}), "
            f"{_mib(rows[0]['dit_bytes_rank0']['full'] / 2)} MiB float32 per expert; MagCache thresh "
            f"{rec['flags']['thresh']} K {rec['flags']['K']} R {rec['flags']['retention']}. Figures are from "
            f"generation {rec['flags']['generations']} of {rec['flags']['generations']} in each job (the first, "
            f"{rec['flags'].get('warmup_steps')} steps, warms up).\n")
        parts.append("**Collectives per DiT forward** (rank 0; payload = bytes this rank hands to the collective; "
                     "load-independent). " + FORMULA_TEXT + "\n")
        table = []
        for r in rows:
            comp, skip, fo = r["per_forward"]["computed"]["kinds"], r["per_forward"]["skipped"]["kinds"], r["formula"]
            a2a_c, a2a_b = _calls(comp, "all_to_all_single")
            fs_c, fs_b = _calls(comp, "all_gather_single")
            ri_c, ri_b = _calls(comp, "batch_isend_irecv")
            ga_c, ga_b = _calls(comp, "all_gather")
            sy_c = r["timing"]["sync_calls"]
            skip_desc = ", ".join(f"{k} {v['calls_max']}x {v['payload_max']} B" for k, v in sorted(skip.items())) or "—"
            table.append([
                r["layout"]["name"], f"{r['computed']} / {r['skipped']} ({r['retained']} retained)",
                f"{a2a_c} x, {_mib(a2a_b)} MiB ({_mib(a2a_b * (r['world'] - 1) / r['world'])} off-rank)"
                if a2a_c else "—",
                (f"{fo['a2a_calls']} x, {_mib(fo['a2a_payload'])} MiB " if fo["a2a_calls"] else "none ")
                + ("✓" if r["a2a_matches_formula"] else "✗"),
                f"{ga_c} x, {ga_b / 1024:.0f} KiB " + ("✓" if r["gather_matches_formula"] else "✗")
                if ga_c else "—",
                f"{fs_c} x, {_mib(fs_b)} MiB → {_mib(fs_b * r['world'])} "
                + ("✓" if r["fsdp_matches_formula"] else "✗") if fs_c else "—",
                (f"{ri_c} x, {_mib(ri_b)} MiB " if ri_c else "none ")
                + ("✓" if r.get("ring_matches_formula", True) else "✗"),
                f"{sy_c} x 4 B" if sy_c else "—", skip_desc,
                "✓" if r["dispatcher_check"]["equal"] and r["counts_equal_across_generations"] else "✗",
            ])
        parts.append(markdown_table(
            ["layout", "computed / skipped forwards", "all-to-all per computed fwd", "Ulysses formula",
             "output gather per fwd", "FSDP block all-gathers per computed fwd", "ring k/v sends per computed fwd",
             "MagCache syncs (run)", "per skipped fwd", "dispatcher check"], table, align="llrrrrrrlc"))
        parts.append(
            "\n\"dispatcher check\": the wrapped calls equal the c10d ops the dispatcher ran (TorchDispatchMode) in "
            "the warm-up's denoise loop, and per-forward counts are the same in both generations. Outside the "
            "denoise loop: " + _setup_text(rows) + "\n")
        parts.append("**Time** (wall clock, **noisy**: 2 shared cores, so 4 ranks cannot run faster than 2; "
                     "the table has the shape GPU runs will fill). Slowest rank.\n")
        parts.append(markdown_table(
            ["layout", "denoise / step", "in collectives (incl. waiting for peers)", "MagCache syncs",
             "per sync in the loop", "sync / denoise", "per sync back to back", "intrinsic sync / denoise"],
            [[r["layout"]["name"], f"{r['timing']['denoise_s_per_step'] * 1e3:.0f} ms",
              f"{100 * r['timing']['comm_share_of_denoise']:.1f}%", str(r["timing"]["sync_calls"]),
              f"{r['timing']['sync_us_per_call']:.0f} µs" if r["timing"]["sync_calls"] else "—",
              f"{100 * r['timing']['sync_share_of_denoise']:.2f}%",
              f"{r['timing']['sync_back_to_back_us']:.0f} µs" if r["timing"]["sync_calls"] else "—",
              f"{100 * r['timing']['sync_intrinsic_share_of_denoise']:.3f}%"] for r in rows]))
        parts.append(
            "\nA sync in the loop also waits for the slowest rank to arrive (on oversubscribed cores that is most "
            "of it, and that wait would otherwise move to the next all-to-all); *back to back* is the agreement "
            "alone with the ranks aligned (median of 300), and *intrinsic* = back-to-back x syncs / denoise time.\n")
        parts.append(
            "\n**Host memory per rank** (MiB, worst rank; RSS from /proc/self/status, peaks reset between "
            "phases with /proc/self/clear_refs). *Fixed overhead* = RSS before loading (torch, libraries, "
            "gloo, mesh); the 1-rank row is the nothing-loaded baseline. *DiT held* = bytes of the DiT tensors "
            "on the rank (exact), against 1/N of the blocks + the replicated root per expert.\n")
        mem_rows = []
        for r in rows:
            mem_rows.append([r["layout"]["name"]] + memory_cells(r))
        parts.append(markdown_table(
            ["layout", "fixed overhead (RSS before load)", "load peak RSS (+fixed)", "DiT held / expected",
             "generate peak RSS (+fixed)", "generate peak PSS (+PSS before load)", "after generate: anon / file"],
            mem_rows))
        parts.append("\n" + memory_note(rec["figures"]["layouts"]) + "\n")  # current wording, stored figures
    return "\n".join(parts)


def memory_cells(r: dict[str, Any]) -> list[str]:
    """Worst rank per column (MiB)."""
    mem = r["memory"]
    fixed = max(x["rss_before_load_mb"] for x in mem)
    load = max(x["load_peak_mb"] or 0 for x in mem)
    gen = max(x["generate_peak_mb"] or 0 for x in mem)
    pss = max(mem, key=lambda x: x["generate_peak_pss_mb"] or 0)
    pss_over = (pss["generate_peak_pss_mb"] or 0) - (pss["pss_before_load_mb"] or 0)
    held = max(mem, key=lambda x: x["dit_held_mb"])
    anon = max(mem, key=lambda x: x["after_generate"]["RssAnon"] or 0)["after_generate"]
    return [f"{fixed:.0f}", f"{load:.0f} (+{load - fixed:.0f})",
            f"{held['dit_held_mb']:.1f} / {held['dit_expected_mb']:.1f}", f"{gen:.0f} (+{gen - fixed:.0f})",
            f"{pss['generate_peak_pss_mb'] or 0:.0f} (+{pss_over:.0f})",
            f"{anon['RssAnon']:.0f} / {anon['RssFile']:.0f}"]


def _setup_text(rows: list[dict[str, Any]]) -> str:
    """Collectives outside the denoise loop, per layout (layouts with the same list are merged)."""
    texts: dict[str, list[str]] = {}
    for r in rows:
        if r["world"] == 1:
            continue
        desc = []
        for where, phases in (("setup", ("runtime", "load")), ("measured_generation", ("text", "prepare", "decode",
                                                                                       "finish"))):
            for phase in phases:
                kinds = r["phases_rank0"][where].get(phase, {})
                if kinds:
                    desc.append(f"{phase}: " + ", ".join(f"{k} {int(v[0])}" for k, v in sorted(kinds.items())))
        texts.setdefault("; ".join(desc) or "none", []).append(r["layout"]["name"])
    return " ".join(f"{', '.join(names)}: {text}." for text, names in texts.items()) + \
        " Text encoding and latent preparation run no collective; `decode` is the row-split VAE decode's halo " \
        "exchange (batch_isend_irecv, where the run has one); `finish` is the manifest's peak-memory gather, " \
        "`runtime` the seed agreement."


#: T5, VAE, tokenizer and one tensor in flight while loading
LOAD_ALLOWANCE_MB = 32


def memory_note(rows: list[dict[str, Any]]) -> str:
    """What the memory table shows, from the figures (so it cannot go stale)."""
    base = next((r for r in rows if r["world"] == 1), rows[0])
    fixed = max(x["rss_before_load_mb"] for x in base["memory"])
    expert = base["dit_bytes_rank0"]["full"] / 2 / MiB
    bits = [f"Fixed overhead: {fixed:.0f} MiB RSS with nothing loaded on 1 rank (torch, diffusers, transformers); "
            f"one expert is {expert:.1f} MiB. Target: a sharded load peaks at most {LOAD_ALLOWANCE_MB} MiB (T5, VAE, "
            "a tensor in flight) above the fixed overhead plus what the rank keeps: 1/N of each expert's blocks and "
            "its replicated root (the *expected* column)."]
    for r in rows:
        if not r["fsdp_active"] or r["layout"]["malloc"] != "fixed":
            continue
        n, mem = r["world"], r["memory"]
        held = max(x["dit_held_mb"] for x in mem)
        load_over = max((x["load_peak_mb"] or 0) - x["rss_before_load_mb"] for x in mem)
        pss_over = max((x["generate_peak_pss_mb"] or 0) - (x["pss_before_load_mb"] or 0) for x in mem)
        anon_over = max((x["generate_peak_composition"]["RssAnon"] or 0) - (x["anon_before_load_mb"] or 0)
                        for x in mem)
        verdict = "met" if load_over <= held + LOAD_ALLOWANCE_MB else "missed"
        bits.append(f"{n} ranks `--dit_fsdp`: holds {held:.1f} MiB of DiT per rank; load peak +{load_over:.0f} MiB "
                    f"({verdict}); generating, PSS peaks +{pss_over:.0f} MiB over its pre-load value, anonymous "
                    f"memory +{anon_over:.0f} MiB at the RSS peak (the rank's rows, activations, the gathered "
                    "block, gloo buffers).")
    default = next((r for r in rows if r["layout"]["malloc"] == "default"), None)
    if default is not None:
        worst = max(default["memory"], key=lambda x: x["generate_peak_mb"] or 0)
        fixed_row = next((r for r in rows if r["world"] == default["world"] and r["fsdp_active"]
                          and r["layout"]["malloc"] == "fixed"), None)
        ref = f" (vs {max(x['generate_peak_mb'] or 0 for x in fixed_row['memory']):.0f})" if fixed_row else ""
        bits.append(
            f"Allocator: all rows but one run with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}. Under glibc's default "
            f"dynamic threshold the {default['world']}-rank FSDP generate peak is {worst['generate_peak_mb']:.0f} MiB"
            f"{ref}: FSDP's freed per-block all-gather buffers stay cached on the heap (anon "
            f"{worst['after_generate']['RssAnon']:.0f} MiB after generating, "
            f"{worst['after_generate_trimmed_anon_mb'] or 0:.0f} MiB after malloc_trim).")
    bits.append(
        "Loading reads each rank's rows with positioned reads into fresh memory (no memory map, so no "
        "file-backed pages count against the rank) and hands one sharded block at a time to FSDP2. Without "
        "`--dit_fsdp` every rank holds both experts (held = 2 experts at any N).")
    return " ".join(bits)


def update_markdown(path: Path, results_dir: Path) -> None:
    replace_section(path, SECTION, render(load_results(BENCHMARK, results_dir)))


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (--ulysses_size = world; "
                                                    "must divide the bench DiT's 4 heads)")
    p.add_argument("--ckpt-dir", type=Path, help="existing t2v-A14B checkpoint (default: random --preset bench)")
    p.add_argument("--size", default="128*128")
    p.add_argument("--frames", type=int, default=9, help="4n+1")
    p.add_argument("--steps", type=int, default=10, help="10 steps: both experts run, half the forwards skip")
    p.add_argument("--thresh", type=float, default=0.06)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--retention", type=float, default=0.2)
    p.add_argument("--generations", type=int, default=2, help="per job; the last one is measured")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps of the warm-up generation (both experts run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--no-malloc-compare", action="store_true",
                   help="skip the extra FSDP job under glibc's default mmap threshold")
    p.add_argument("--only", default="", help="run only the layouts whose name contains this (e.g. 'ring')")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--name", default="parallel-cpu")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    args = p.parse_args(argv)
    args.world_list = [int(w) for w in args.worlds.split(",") if w.strip()]
    if not args.world_list or any(w < 1 or 4 % w for w in args.world_list):
        p.error("--worlds: sizes must divide the bench DiT's 4 heads (1, 2, 4)")
    if args.generations < 1 or args.steps < 1 or args.threads < 1:
        p.error("--generations, --steps and --threads must be >= 1")
    return args


def print_layout(r: dict[str, Any], log) -> None:
    comp = r["per_forward"]["computed"]["kinds"]
    skip = r["per_forward"]["skipped"]["kinds"]
    fmt = lambda kinds: ", ".join(f"{k} {v['calls_max']}x/{v['payload_max']}B" for k, v in sorted(kinds.items())) or "none"  # noqa: E731
    t = r["timing"]
    log(f"  forwards {r['forwards']} (computed {r['computed']}, skipped {r['skipped']}); decisions equal on all "
        f"ranks: {r['decisions_equal_across_ranks']}")
    log(f"  per computed forward: {fmt(comp)}")
    log(f"  per skipped forward:  {fmt(skip)}")
    log(f"  Ulysses formula a2a {r['formula']['a2a_calls']}x/{r['formula']['a2a_payload']}B: "
        f"{'match' if r['a2a_matches_formula'] else 'MISMATCH'}; dispatcher check {r['dispatcher_check']}")
    log(f"  ring formula {r['formula'].get('ring_calls', 0)}x/{r['formula'].get('ring_payload', 0)}B: "
        f"{'match' if r.get('ring_matches_formula', True) else 'MISMATCH'}")
    log(f"  denoise {t['denoise_s_per_step'] * 1e3:.0f} ms/step, collectives {100 * t['comm_share_of_denoise']:.1f}%, "
        f"sync {t['sync_calls']}x {t['sync_us_per_call']:.0f} us = {100 * t['sync_share_of_denoise']:.3f}% "
        f"(back to back {t['sync_back_to_back_us']:.0f} us -> {100 * t['sync_intrinsic_share_of_denoise']:.3f}%) (noisy)")
    cells = memory_cells(r)
    log(f"  memory MiB (worst rank): fixed {cells[0]}, load peak {cells[1]}, DiT held/expected {cells[2]}, "
        f"generate peak RSS {cells[3]}, PSS {cells[4]}, anon/file after {cells[5]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun.start(args, update_markdown)
    if run is None:
        return 0
    log = run.log
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        work = Path(tmp)
        ckpt = run.checkpoint(work, TASK, _make_checkpoint)
        facts = model_facts(ckpt, args)
        log(f"DiT {facts['dim']} x {facts['layers']} layers, {facts['heads']} heads; {facts['seq_len']} tokens; "
            f"{args.steps} steps x {args.generations} generations per job")
        for layout in [x for x in layouts(args.world_list, not args.no_malloc_compare) if args.only in x["name"]]:
            log(f"{layout['name']}: torchrun ...")
            ranks, wall = run_layout(layout, ckpt, work, args, log)
            row = analyse(layout, ranks, facts, args)
            row["job_wall_s"] = wall
            rows.append(row)
            print_layout(row, log)
    figures = {"layouts": rows}
    flags = {**run.flags("world_list"), "malloc_mmap_threshold": MMAP_THRESHOLD}
    record = run.record(benchmark=BENCHMARK, figures=figures, flags=flags,
                        model={k: v for k, v in facts.items() if k != "block_params"},
                        formula=FORMULA_TEXT, memory_note=memory_note(rows))
    log(record["memory_note"])
    return run.save(record)


if __name__ == "__main__":
    sys.exit(main())
