#!/usr/bin/env python
"""Measure the trained tiny-shapes model against a random one, and MagCache on it.

    python scripts/bench_tiny_shapes.py [--ckpt models/tiny-shapes] [--work /tmp/tiny-shapes-bench] [--prompts 24]

Writes benchmarks/results/tiny-shapes-cpu.json and three plots in docs/:
  - VAE reconstruction PSNR on held-out clips: trained vs the random tiny VAE (make_tiny_checkpoint)
  - generated videos (uncached, one per prompt/seed): frame-to-frame PSNR, and how often the detector
    (benchmarks/shapes.detect) reads the prompt's colour, direction and background off the frames
  - the model's calibrated ratio curve beside the bundled Wan2.2 ones (docs/tiny_shapes_ratios.png)
  - `magcache-launch sweep` over thresholds 0.02-0.3, retention 0 and 0.2 (docs/tiny_shapes_sweep.png)
  - ulysses 2 and cfg-parallel (torchrun, gloo) cached latents against one process's
Every figure is measured here; nothing is copied from elsewhere. Resumable (the sweeps and batches are).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks import shapes  # noqa: E402
from launcher.checkpoint import inspect_checkpoint  # noqa: E402
from launcher.checkpoint.load import load_vae  # noqa: E402
from launcher.cli import main as cli  # noqa: E402
from launcher.quality.frames import load_frames  # noqa: E402
from launcher.wan import vae as wan_vae  # noqa: E402
from launcher.wan.tasks import TASKS  # noqa: E402
from magcache.ratios import BUNDLED_KEYS, bundled_table, load_ratio_file  # noqa: E402

THRESHOLDS = "0.02,0.04,0.06,0.08,0.1,0.15,0.2,0.3"
COMMON = ["--task", "t2v-A14B", "--size", "64*64", "--frame_num", "9"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompt_items(n: int) -> list[dict]:
    """n (prompt, seed) pairs spread over the scene list: every shape, colour, direction, background."""
    scenes = shapes.all_scenes()
    step = len(scenes) / n
    return [{"prompt": scenes[int(i * step + 3) % len(scenes)].prompt, "seed": 100 + i, "name": f"p{i:02d}"}
            for i in range(n)]


def scene_of(prompt: str) -> shapes.Scene:
    return next(s for s in shapes.all_scenes() if s.prompt == prompt)


def frame_to_frame_psnr(video: np.ndarray) -> float:
    """Mean PSNR (dB, peak 255) between consecutive frames of uint8 [F, H, W, 3]."""
    v = video.astype(np.float64)
    mse = ((v[1:] - v[:-1]) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def video_scores(videos: dict[str, Path], items: list[dict]) -> dict:
    rows = []
    for item in items:
        frames = load_frames(videos[item["name"]]).data
        det = shapes.detect(torch.from_numpy(frames))
        want = scene_of(item["prompt"])
        rows.append({"name": item["name"], "prompt": item["prompt"], "seed": item["seed"],
                     "frame_to_frame_psnr": round(frame_to_frame_psnr(frames), 2),
                     "detected": {"colour": det.colour, "direction": det.direction, "background": det.background},
                     "colour_ok": det.colour == want.colour, "direction_ok": det.direction == want.direction,
                     "background_ok": det.background == want.background})
    n = len(rows)
    return {
        "videos": n,
        "frame_to_frame_psnr_mean": round(float(np.mean([r["frame_to_frame_psnr"] for r in rows])), 2),
        "colour_rate": sum(r["colour_ok"] for r in rows) / n,
        "direction_rate": sum(r["direction_ok"] for r in rows) / n,
        "background_rate": sum(r["background_ok"] for r in rows) / n,
        "colour_and_direction_rate": sum(r["colour_ok"] and r["direction_ok"] for r in rows) / n,
        "per_video": rows,
    }


@torch.no_grad()
def vae_psnr(ckpt: Path, clips: int = 16) -> float:
    vae, _ = load_vae(inspect_checkpoint(ckpt, TASKS["t2v-A14B"]), device="cpu")
    values = []
    for i in range(clips):
        _, video = shapes.clip(3_000_000 + i)
        rec = wan_vae.decode(vae, wan_vae.encode(vae, video))
        mse = float(((rec - video) ** 2).mean())
        values.append(10 * np.log10(4.0 / max(mse, 1e-12)))
    return round(float(np.mean(values)), 2)


def run_batch(ckpt: Path, prompts: Path, out: Path) -> dict[str, Path]:
    code = cli(["batch", str(prompts), *COMMON, "--ckpt_dir", str(ckpt), "--out-dir", str(out)])
    if code not in (0, None):
        raise SystemExit(f"batch on {ckpt} failed ({code})")
    return {p.stem: p for p in out.glob("*.mp4")}


def run_sweep(ckpt: Path, prompts: Path, out: Path, retention: float, thresholds: str) -> dict:
    if (out / "sweep.json").exists():  # a finished sweep (e.g. run as its own command, in parallel)
        log(f"  using {out / 'sweep.json'}")
        return json.loads((out / "sweep.json").read_text())
    try:
        cli(["sweep", *COMMON, "--ckpt_dir", str(ckpt), "--prompts", str(prompts), "--out-dir", str(out),
             "--thresholds", thresholds, "--retention_ratio", str(retention)])
    except SystemExit as e:  # typer.Exit from the sweep command
        if e.code not in (0, None):
            raise
    return json.loads((out / "sweep.json").read_text())


def torchrun_latents(ckpt: Path, out: Path, prompt: str, *extra: str) -> tuple[torch.Tensor, dict]:
    out.mkdir(parents=True, exist_ok=True)
    video, lat = out / "v.mp4", out / "latents.safetensors"
    args = ["generate", *COMMON, "--ckpt_dir", str(ckpt), "--prompt", prompt, "--base_seed", "5", "--use_magcache",
            "--save_file", str(video), "--save-latents", str(lat), "--overwrite", *extra]
    if extra:
        # `-m launcher` from the repository root: this checkout's code, whatever the venv's console script points at
        cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "launcher", *args]
    else:
        cmd = [sys.executable, "-m", "launcher", *args]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = json.loads(video.with_suffix(".json").read_text())
    return load_file(lat)["latents"], manifest


def parallel_equality(ckpt: Path, work: Path) -> dict:
    prompt = shapes.all_scenes()[5].prompt
    one, m1 = torchrun_latents(ckpt, work / "one", prompt)
    out = {"prompt": prompt, "one_process_skipped": m1["magcache"]["skipped_count"]}
    for label, extra in (("ulysses2", ("--ulysses_size", "2")), ("cfg_parallel", ("--cfg-parallel",))):
        lat, m = torchrun_latents(ckpt, work / label, prompt, *extra)
        same = [(d["index"], d["skip"]) for d in m["magcache"]["decisions"]] == \
               [(d["index"], d["skip"]) for d in m1["magcache"]["decisions"]]
        out[label] = {"max_abs_latent_diff": float((lat - one).abs().max()), "same_skip_decisions": same,
                      "skipped": m["magcache"]["skipped_count"]}
    return out


def plot_ratios(table_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in BUNDLED_KEYS:
        t = bundled_table(key)
        mag = t.mag(t.sample_steps)
        ax.plot(np.linspace(0, 1, t.sample_steps), mag[0::2], lw=1, alpha=0.8, label=f"Wan2.2 {key} (bundled, cond)")
    ours = load_ratio_file(table_path)
    mag = ours.mag(ours.sample_steps)
    x = np.linspace(0, 1, ours.sample_steps)
    ax.plot(x, mag[0::2], "k-", lw=2, label="tiny-shapes (calibrated, cond)")
    ax.plot(x, mag[1::2], "k--", lw=1.5, label="tiny-shapes (calibrated, uncond)")
    ax.set_xlabel("step / steps")
    ax.set_ylabel("magnitude ratio ||r_t|| / ||r_t-1||")
    ax.set_title("MagCache ratio curves: tiny-shapes vs the bundled Wan2.2 tables")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_sweeps(sweeps: dict[str, dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, report in sweeps.items():
        rows = [s for s in report["settings"] if s["thresh"] is not None]
        x = [s["forward_speedup"]["mean"] for s in rows]
        for ax, metric in zip(axes, ("psnr", "ssim")):
            ax.plot(x, [s[metric]["mean"] for s in rows], "o-", label=label)
            for s, xi in zip(rows, x):
                ax.annotate(f"{s['thresh']['mean']:g}", (xi, s[metric]["mean"]), fontsize=6)
    for ax, name in zip(axes, ("PSNR to uncached (dB)", "SSIM (luma) to uncached")):
        ax.set_xlabel("forward-count speed-up")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MagCache sweep on tiny-shapes (64x64x9, 40 UniPC steps; labels = threshold)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


DEMO_PROMPT, DEMO_SEED = "a red square moving down on a blue background", 40  # scripts/demo.sh's defaults


def demo_strip(ckpt: Path, work: Path, extra_rows: dict[str, Path], png: Path) -> dict:
    """The demo prompt uncached and with default MagCache (lossless frames), plus other videos, as one PNG
    of frame strips; returns the detector's reading of the demo videos."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, found = {}, {}
    for label, extra in (("uncached", ()), ("MagCache (default)", ("--use_magcache",))):
        out = work / ("demo-" + label.split()[0].lower())
        cli(["generate", *COMMON, "--ckpt_dir", str(ckpt), "--prompt", DEMO_PROMPT, "--base_seed", str(DEMO_SEED),
             "--save_file", str(out / "v.mp4"), "--save-frames", str(out / "frames"), "--overwrite", *extra])
        rows[f"{label}: {DEMO_PROMPT}"] = load_frames(out / "frames").data
        det = shapes.detect(torch.from_numpy(rows[f"{label}: {DEMO_PROMPT}"]))
        found[label] = {"colour": det.colour, "direction": det.direction, "background": det.background}
    for label, path in extra_rows.items():
        rows[label] = load_frames(path).data
    fig, axes = plt.subplots(len(rows), shapes.FRAMES, figsize=(shapes.FRAMES * 1.1, len(rows) * 1.35))
    for r, (label, frames) in enumerate(rows.items()):
        for f in range(shapes.FRAMES):
            ax = axes[r, f]
            ax.imshow(frames[f], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_title(label, fontsize=7, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.35)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return found


def markdown(result: dict) -> str:
    """The BENCHMARKS.md tables of one result (pasted under its section)."""
    g, v = result["generated"], result["vae_psnr_db"]
    lines = ["| | trained (models/tiny-shapes) | random (make_tiny_checkpoint) |", "| --- | --- | --- |",
             f"| VAE reconstruction PSNR, {v['clips']} held-out clips | {v['trained']} dB | {v['random']} dB |"]
    for key, name in (("frame_to_frame_psnr_mean", "frame-to-frame PSNR of generated videos"),
                      ("colour_rate", "prompt's colour detected"), ("direction_rate", "prompt's direction detected"),
                      ("background_rate", "prompt's background detected"),
                      ("colour_and_direction_rate", "colour and direction both right")):
        t, r = g["trained"][key], g["random"][key]
        fmt = (lambda x: f"{x} dB") if "psnr" in key else (lambda x: f"{x:.0%}")
        lines.append(f"| {name} ({g['trained']['videos']} prompts/seeds) | {fmt(t)} | {fmt(r)} |")
    lines += ["", "| retention | thresh | forward speed-up | wall speed-up | PSNR to uncached (dB) | SSIM (luma) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for label, rows in result["sweep"].items():
        for row in rows:
            if row["thresh"] is None:
                continue
            lines.append(f"| {label.split()[-1]} | {row['thresh']['mean']:g} | {row['forward_speedup']['mean']:.2f}x | "
                         f"{row['wall_speedup']['mean']:.2f}x | {row['psnr']['mean']:.2f} (min {row['psnr']['min']:.2f}) | "
                         f"{row['ssim']['mean']:.4f} (min {row['ssim']['min']:.4f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=ROOT / "models" / "tiny-shapes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiny-shapes-bench"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--thresholds", default=THRESHOLDS)
    ap.add_argument("--vae-clips", type=int, default=16)
    ap.add_argument("--skip-parallel", action="store_true")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    items = prompt_items(args.prompts)
    prompts = args.work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(i) + "\n" for i in items))
    random_ckpt = args.work / "random-ckpt"
    if not (random_ckpt / "high_noise_model" / "config.json").exists():
        from launcher.checkpoint.tiny import make_tiny_checkpoint

        make_tiny_checkpoint("t2v-A14B", "official", random_ckpt, seed=0)

    result: dict = {"checkpoint": str(args.ckpt.relative_to(ROOT)) if args.ckpt.is_relative_to(ROOT) else str(args.ckpt),
                    "prompts": items, "device": "cpu", "torch_threads": torch.get_num_threads()}
    log("VAE reconstruction PSNR")
    result["vae_psnr_db"] = {"trained": vae_psnr(args.ckpt, args.vae_clips),
                            "random": vae_psnr(random_ckpt, args.vae_clips), "clips": args.vae_clips}
    log(f"  {result['vae_psnr_db']}")

    sweeps = {}
    for retention in (0.0, 0.2):
        label = f"retention {retention:g}"
        log(f"sweep, {label}")
        sweeps[label] = run_sweep(args.ckpt, prompts, args.work / f"sweep-r{retention:g}", retention,
                                   args.thresholds)
    result["sweep"] = {label: report["settings"] for label, report in sweeps.items()}

    log("generated videos: trained (the sweep's uncached references) and random")
    trained_videos = {p.parent.name: p for p in (args.work / "sweep-r0").glob("*/reference.mp4")}
    random_videos = run_batch(random_ckpt, prompts, args.work / "random-batch")
    result["generated"] = {"trained": video_scores(trained_videos, items), "random": video_scores(random_videos, items)}
    for k, v in result["generated"].items():
        log(f"  {k}: f2f PSNR {v['frame_to_frame_psnr_mean']} dB, colour {v['colour_rate']:.2f}, "
            f"direction {v['direction_rate']:.2f}, both {v['colour_and_direction_rate']:.2f}")

    table = args.ckpt / "magcache_ratios.json"
    docs = ROOT / "docs"
    refs = {f"uncached: {i['prompt']} (seed {i['seed']})": trained_videos[i["name"]] for i in items[:4]}
    result["demo"] = demo_strip(args.ckpt, args.work, refs, docs / "tiny_shapes_frames.png")
    plot_ratios(table, docs / "tiny_shapes_ratios.png")
    plot_sweeps(sweeps, docs / "tiny_shapes_sweep.png")
    ours = load_ratio_file(table)
    result["ratio_table"] = {"source": str(table.relative_to(ROOT)) if table.is_relative_to(ROOT) else str(table),
                             "sample_steps": ours.sample_steps, "cond": list(ours.ratios[0::2]),
                             "uncond": list(ours.ratios[1::2])}
    stored = args.work / "parallel.json"
    if stored.exists():
        result["parallel"] = json.loads(stored.read_text())
    elif not args.skip_parallel:
        log("ulysses 2 and cfg-parallel against one process")
        result["parallel"] = parallel_equality(args.ckpt, args.work / "parallel")
        log(f"  {result['parallel']}")
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = ROOT / "benchmarks" / "results" / "tiny-shapes-cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
