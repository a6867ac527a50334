#!/usr/bin/env python
"""Band-split VAE decode on CPU/gloo: equality with one rank, strong scaling, peak memory, halo bytes.

    python scripts/bench_vae.py                       # both VAEs, 1/2/4 ranks at 256*144, 9 frames (~5 min on 2 cores)
    python scripts/bench_vae.py --versions 2.1 --worlds 1,2 --frames 5 --no-save   # smoke run
    python scripts/bench_vae.py --render-only         # BENCHMARKS.md from the stored JSON

For each VAE (Wan2.1 z16 and Wan2.2 z48, real decoder sizes, seeded random weights) it decodes one
seeded latent with `benchmarks/vae_job.py`: once in one process (today's path, `launcher.wan.vae.decode`),
then under `torchrun --standalone` with N ranks (`launcher.wan.vae_parallel`), one thread per rank
in every job (as one GPU per rank would be). Figures:

- equality: max abs difference of the N-rank video to the one-rank video (float32) and whether it is bitwise;
- strong scaling: decode wall time (slowest rank: band + gather to rank 0) at N ranks / at one rank;
- memory: each rank's host peak RSS during the decode above its RSS before it; worst rank / one rank;
- halo bytes: per layer, the bytes all ranks sent, against 2 (N-1) h E 4 where h = 1 halo row and
  E = sum over the layer's calls of one row's elements (C x frames seen x width), read from the one-rank run.

Writes `benchmarks/results/<name>.json` and the `vae` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (
    BENCHMARKS_MD, BenchRun, RESULTS_DIR, load_results, markdown_table, replace_section,
)
from parallel.halo import halo_bytes_per_exchange

BENCHMARK = "vae-cpu"
SECTION = "vae"
JOB = ROOT / "benchmarks" / "vae_job.py"
HALO = 1
MMAP_THRESHOLD = 1 << 20
ELEM = 4  # float32
FORMULA_TEXT = ("halo bytes of one layer, all ranks together = 2 (N-1) h E 4: each of the N-1 cuts carries h = 1 "
                "row both ways, E = sum over the layer's calls of C x T x W (channels, frames the causal conv "
                "sees including its 2 cached ones, band width), 4 bytes a float32")


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # glibc keeps freed large blocks on the heap after its mmap threshold grows, so the RSS peak would
    # track the allocator's history rather than live tensors (as in bench_parallel.py)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def run_job(world: int, version: str, args: argparse.Namespace, out: Path, extra: list[str]) -> list[dict[str, Any]]:
    job = [str(JOB), "--version", version, "--height", str(args.height), "--width", str(args.width),
           "--frames", str(args.frames), "--out", str(out), *extra]
    cmd = ([sys.executable, *job] if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *job])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=3600, check=False)
    if proc.returncode != 0 or "terminate called" in proc.stderr:
        raise SystemExit(f"{version} x {world} ranks failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def analyse(version: str, runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    one = runs[1][0]
    elements = one["row_elements"]
    rows = []
    for world, ranks in sorted(runs.items()):
        r0 = ranks[0]
        wall = max(r["decode_s"] for r in ranks)
        peak = max(r["decode_peak_above_before_mib"] for r in ranks)
        cpu = max(r["decode_cpu_s"] for r in ranks)
        row: dict[str, Any] = {
            "ranks": world, "split": r0["split"], "decode_s": round(wall, 3), "decode_cpu_s": round(cpu, 3),
            "cpu_vs_one_rank": round(cpu / one["decode_cpu_s"], 3),
            "band_s": [round(r["band_s"], 3) for r in ranks], "gather_float32_s": round(r0["gather_s"], 3),
            "gather_uint8_s": round(r0["gather_uint8_s"], 3),
            "peak_above_before_mib": [round(r["decode_peak_above_before_mib"], 1) for r in ranks],
            "time_vs_one_rank": round(wall / one["decode_s"], 3),
            "peak_vs_one_rank": round(peak / one["decode_peak_above_before_mib"], 3),
        }
        if world > 1:
            parts = r0["split"]["ranks"]
            measured = {k: sum(r["halo_bytes"].get(k, 0) for r in ranks) for k in elements}
            formula = {k: halo_bytes_per_exchange(parts, HALO, e, ELEM) for k, e in elements.items()}
            row.update(max_abs_diff=r0["max_abs_diff"], bitwise_equal=r0["bitwise_equal"],
                       halo_bytes_total=sum(measured.values()), halo_layers=len(measured),
                       halo_formula_exact=measured == formula,
                       halo_mismatches={k: [measured[k], formula[k]] for k in elements if measured[k] != formula[k]})
        rows.append(row)
    return {"version": version, "latent_shape": one["latent_shape"], "video_shape": one["video_shape"],
            "halo_layers": {k: {"row_elements": e, "bytes_at_2_ranks": halo_bytes_per_exchange(2, HALO, e, ELEM)}
                            for k, e in elements.items()},
            "rows": rows}


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def render(records: list[dict[str, Any]]) -> str:
    out = [("```bash\n. .venv/bin/activate\npython scripts/bench_vae.py               # both VAEs, 1/2/4 ranks\n"
            "python scripts/bench_vae.py --render-only # this section from benchmarks/results/vae-*.json\n```\n")]
    for rec in records[:1]:
        m, f = rec["machine"], rec["flags"]
        out.append(f"`{rec['name']}` ({rec['date']}): {m['cpu_model']}, {m['usable_cpus']} usable CPUs "
                   f"({m['physical_cores']} physical cores), load average {m.get('load_avg_at_start')} at start, "
                   f"shared with other work. One thread per rank in every job. Video {f['width']}*{f['height']}, "
                   f"{f['frames']} frames; real-size decoders, random weights; float32.\n")
        rows = []
        for v in rec["figures"]["versions"]:
            for r in v["rows"]:
                eq = "—" if r["ranks"] == 1 else ("bitwise" if r["bitwise_equal"] else f"{r['max_abs_diff']:.1e}")
                halo = "—" if r["ranks"] == 1 else (f"{_mib(r['halo_bytes_total'])}, {r['halo_layers']} layers, "
                                                   f"{'= formula' if r['halo_formula_exact'] else 'DIFFERS'}")
                rows.append([f"Wan{v['version']} {v['latent_shape']}", r["ranks"],
                             f"{r['split']['latent_rows']}" + (" (fallback)" if "fallback" in r["split"] else ""),
                             f"{r['decode_s']:.2f} s", f"{r['time_vs_one_rank']:.2f}",
                             f"{r['decode_cpu_s']:.2f} s", f"{r['cpu_vs_one_rank']:.2f}",
                             f"{max(r['peak_above_before_mib']):.0f} MiB", f"{r['peak_vs_one_rank']:.2f}", eq,
                             "—" if r["ranks"] == 1 else f"{r['gather_float32_s']:.3f} / {r['gather_uint8_s']:.3f} s",
                             halo])
        out.append(markdown_table(
            ["VAE, latent", "ranks", "latent rows per rank", "decode wall", "x one rank", "decode CPU",
             "x one rank", "peak / rank",
             "x one rank", "max abs diff", "gather f32 / u8", "halo bytes"], rows))
        out.append(f"\nDecode wall = the slowest rank's band decode + the float32 gather of the video to rank 0; "
                   f"decode CPU = the same window's CPU seconds of the busiest rank (one thread per rank: its "
                   f"compute and its gloo work, not its waits), which is what a rank with a core of its own "
                   f"would take on a machine with nothing else running. "
                   f"Peak = host RSS high-water mark during the decode above the RSS before it (VmHWM after "
                   f"/proc/self/clear_refs), the worst rank. {rec['formula']}; checked layer by layer, the "
                   f"row elements E taken from the one-rank run.")
        if rec.get("note"):
            out.append("\n" + rec["note"])
    return "\n".join(out)


def update_markdown(path: Path, results_dir: Path) -> None:
    replace_section(path, SECTION, render(load_results(BENCHMARK, results_dir)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", default="2.1,2.2")
    p.add_argument("--worlds", default="1,2,4", help="rank counts; 1 is always run (the reference)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=144)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--name", default="vae-cpu")
    p.add_argument("--note", default="", help="a sentence for BENCHMARKS.md (e.g. what else ran on the machine)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun.start(args, update_markdown)
    if run is None:
        return 0
    log = run.log
    worlds = sorted({1, *(int(w) for w in args.worlds.split(","))})
    versions = []
    with tempfile.TemporaryDirectory(prefix="bench-vae-") as tmp:
        work = Path(tmp)
        for version in args.versions.split(","):
            runs: dict[int, list[dict[str, Any]]] = {}
            ref = work / f"ref-{version}.pt"
            for world in worlds:
                extra = ["--save", str(ref)] if world == 1 else ["--reference", str(ref)]
                log(f"Wan{version}: {world} rank(s) ...")
                runs[world] = run_job(world, version, args, work / f"{version}-{world}", extra)
                r = runs[world][0]
                log(f"  decode {max(x['decode_s'] for x in runs[world]):.2f} s, peak "
                    f"{max(x['decode_peak_above_before_mib'] for x in runs[world]):.0f} MiB"
                    + (f", max abs diff {r['max_abs_diff']:.2e}" if world > 1 else ""))
            versions.append(analyse(version, runs))
    return run.save(run.record(benchmark=BENCHMARK, figures={"versions": versions}, flags=run.flags("note"),
                               formula=FORMULA_TEXT, note=args.note))


if __name__ == "__main__":
    sys.exit(main())
