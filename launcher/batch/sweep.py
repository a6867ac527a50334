"""`magcache-launch sweep`: the quality cost of each MagCache setting, measured on your prompts.

For every prompt: the uncached reference once, then one video per threshold (and per target
speedup), all from one seed, with one model load; the items run through the batch machinery,
so a sweep resumes like a batch and spreads over dp replicas. Rank 0 then compares every video
with its prompt's reference (`launcher.quality`) and writes the report: `sweep.json`,
`report.md` and `pareto.png` in --out-dir.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.batch import resolved_item_config
from launcher.batch.items import BatchItem, read_items
from launcher.batch.results import ItemResult, one_line, print_table, write_summary
from launcher.config import RunConfig, with_defaults
from launcher.errors import InputError, UsageError

SWEEP_VERSION = 1


@dataclass(frozen=True, slots=True)
class Setting:
    """One column of the sweep: the uncached reference, a threshold, or a target speedup."""

    label: str
    flags: dict[str, Any]
    thresh: float | None = None
    target_speedup: float | None = None


def parse_floats(text: str | None, flag: str, *, minimum: float) -> list[float]:
    """`0.02,0.04` -> [0.02, 0.04]; each >= minimum, no repeats, in the given order."""
    if text is None or not text.strip():
        return []
    values: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: {part.strip()!r} is not a number; give e.g. 0.02,0.04,0.06") from None
        if not math.isfinite(value) or value < minimum:
            raise UsageError(f"{flag} {text!r}: {value} must be >= {minimum}")
        if value in values:
            raise UsageError(f"{flag} {text!r}: {value} is given twice")
        values.append(value)
    return values


def settings_for(thresholds: list[float], speedups: list[float]) -> list[Setting]:
    if not thresholds and not speedups:
        raise UsageError("give --thresholds (e.g. 0.02,0.04,0.06,0.1) and/or --speedups (e.g. 1.5,2.0)")
    out = [Setting("reference", {"use_magcache": False})]
    out += [Setting(f"thresh-{t:g}", {"use_magcache": True, "magcache_thresh": t}, thresh=t) for t in thresholds]
    out += [Setting(f"speedup-{s:g}", {"use_magcache": True, "magcache_target_speedup": s}, target_speedup=s)
            for s in speedups]
    return out


def sweep_seed(item: BatchItem, flags: dict[str, Any]) -> int:
    """Every video of one prompt shares a seed, or the comparison measures the seed, not the cache:
    the line's seed, else --base_seed, else 0 (a sweep never draws one)."""
    if item.seed is not None:
        return item.seed
    base = int(with_defaults(flags)["base_seed"])
    return base if base >= 0 else 0


def expand(prompts: list[BatchItem], settings: list[Setting], flags: dict[str, Any], out_dir: Path
           ) -> tuple[list[BatchItem], dict[int, RunConfig | str], dict[int, tuple[BatchItem, Setting]]]:
    """prompts x settings -> batch items (index k), their configs (or one-line errors), and what each is."""
    items: list[BatchItem] = []
    configs: dict[int, RunConfig | str] = {}
    what: dict[int, tuple[BatchItem, Setting]] = {}
    for prompt in prompts:
        seed = sweep_seed(prompt, flags)
        for setting in settings:
            k = len(items)
            item = BatchItem(index=k, line=prompt.line, prompt=prompt.prompt, name=f"{prompt.stem}/{setting.label}",
                             image=prompt.image, seed=seed, size=prompt.size, frame_num=prompt.frame_num,
                             negative_prompt=prompt.negative_prompt)
            items.append(item)
            what[k] = (prompt, setting)
            try:
                # batch's own item config: video <out>/<prompt>/<setting>.mp4, the item's seed, threshold resolved
                configs[k] = resolved_item_config(dict(flags, **setting.flags), item, out_dir)
            except InputError as e:
                configs[k] = one_line(e)
    return items, configs, what


def run_sweep(*, prompts_file: Path, out_dir: Path, thresholds: str | None, speedups: str | None,
              force: bool, lpips_weights: Path | None, flags: dict[str, Any]) -> int:
    """Generate what is missing, then report; 0 when every video exists, 3 when any failed."""
    from launcher.batch import EXIT_SOME_FAILED, generate_items, prepare_out_dir
    from launcher.engine.lifecycle import check_inputs, open_engine, probe_config

    started = time.perf_counter()
    settings = settings_for(parse_floats(thresholds, "--thresholds", minimum=0.0),
                            parse_floats(speedups, "--speedups", minimum=1.0))
    prompts = read_items(Path(prompts_file))
    base = probe_config(flags)
    inputs = check_inputs(base)
    out_dir = Path(out_dir)
    items, configs, what = expand(prompts, settings, flags, out_dir)
    bad = next((c for c in configs.values() if isinstance(c, str)), None)
    if bad is not None:
        raise UsageError(bad)  # a sweep with a hole in it compares nothing: fix the flags first
    prepare_out_dir(out_dir)

    with open_engine(base, data_parallel=True, inputs=inputs) as engine:
        world = engine.world
        results = generate_items(engine, items, configs, flags, force=force, prompts_file=Path(prompts_file),
                                 label=f"sweep: {len(prompts)} prompt(s) x {len(settings)} setting(s)", warm_up=True)
        if world.rank == 0:
            write_summary(out_dir / "summary.json", results, prompts_file=str(prompts_file), out_dir=str(out_dir),
                          shard=None, task=base.task.name, world=world.describe(),
                          seconds=round(time.perf_counter() - started, 3))
            print_table(results, title=f"sweep {Path(prompts_file).name} -> {out_dir}")
            report = build_report(results, what, settings, task=base.task.name, lpips_weights=lpips_weights)
            write_report(report, out_dir)
            _print_verdicts(report, out_dir)
    return EXIT_SOME_FAILED if any(r.status == "failed" for r in results) else 0


# -- the report (rank 0) ---------------------------------------------------------------------------
def _spread(values: list[float | None]) -> dict[str, float | None]:
    real = [v for v in values if v is not None and math.isfinite(v)]
    if not real:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(real), "std": statistics.pstdev(real) if len(real) > 1 else 0.0,
            "min": min(real), "max": max(real), "n": len(real)}


def build_report(results: list[ItemResult], what: dict[int, tuple[BatchItem, Setting]], settings: list[Setting],
                 *, task: str, lpips_weights: Path | None) -> dict[str, Any]:
    """Per prompt and setting: speedups from the manifests, quality against the prompt's reference."""
    from launcher.quality.frames import load_frames
    from launcher.quality.lpips import load_lpips
    from launcher.quality.metrics import compare_frames

    lpips = load_lpips(lpips_weights) if lpips_weights is not None else None
    by_prompt: dict[str, dict[str, ItemResult]] = {}
    for r in results:
        prompt, setting = what[r.index]
        by_prompt.setdefault(prompt.stem, {})[setting.label] = r
    rows: list[dict[str, Any]] = []
    for stem, runs in by_prompt.items():
        ref = runs.get("reference")
        if ref is None or ref.status == "failed" or ref.video is None:
            continue
        ref_manifest = json.loads(Path(ref.manifest).read_text(encoding="utf-8"))  # type: ignore[arg-type]
        ref_frames = load_frames(Path(ref.video))
        for setting in settings[1:]:
            run = runs.get(setting.label)
            if run is None or run.status == "failed" or run.video is None:
                continue
            manifest = json.loads(Path(run.manifest).read_text(encoding="utf-8"))  # type: ignore[arg-type]
            comparison = compare_frames(ref_frames, load_frames(Path(run.video)), lpips=lpips)
            mc = manifest["magcache"]
            rows.append({
                "prompt": stem, "setting": setting.label, "thresh": mc.get("thresh"),
                "target_speedup": setting.target_speedup,
                "forward_speedup": mc["forward_speedup"],
                "wall_speedup": ref_manifest["timings_s"]["denoise"] / manifest["timings_s"]["denoise"],
                "skipped_forwards": mc["skipped_count"], "total_forwards": mc["total_forwards"],
                "video": run.video, "quality": comparison.to_json(),
            })
    summary = []
    for setting in settings[1:]:
        mine = [r for r in rows if r["setting"] == setting.label]
        if not mine:
            continue
        summary.append({
            "setting": setting.label, "thresh": _spread([r["thresh"] for r in mine]),
            "target_speedup": setting.target_speedup,
            "forward_speedup": _spread([r["forward_speedup"] for r in mine]),
            "wall_speedup": _spread([r["wall_speedup"] for r in mine]),
            "psnr": _spread([r["quality"]["mean"]["psnr"] for r in mine]),
            "ssim": _spread([r["quality"]["mean"].get("ssim_luma") for r in mine]),
            "lpips": _spread([r["quality"]["mean"].get("lpips") for r in mine]),
            "identical": sum(bool(r["quality"]["identical"]) for r in mine),
        })
    targets = sorted({s.target_speedup for s in settings if s.target_speedup is not None}) or [1.5]
    return {"sweep_version": SWEEP_VERSION, "task": task, "prompts": sorted(by_prompt), "rows": rows,
            "settings": summary, "best_for_target": {f"{t:g}": best_for(summary, t) for t in targets}}


def best_for(summary: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The setting whose mean forward-count speedup reaches `target` at the best mean PSNR (then SSIM)."""
    reaching = [s for s in summary if (s["forward_speedup"]["mean"] or 0) >= target - 1e-9]
    if not reaching:
        return None

    def quality(s: dict[str, Any]) -> tuple[float, float]:
        psnr, ssim = s["psnr"]["mean"], s["ssim"]["mean"]
        return (math.inf if psnr is None else psnr, -math.inf if ssim is None else ssim)

    best = max(reaching, key=quality)
    return {"setting": best["setting"], "thresh": best["thresh"]["mean"],
            "forward_speedup": best["forward_speedup"]["mean"], "psnr": best["psnr"]["mean"],
            "ssim": best["ssim"]["mean"]}


def _cell(spread: dict[str, Any], fmt: str) -> str:
    if spread["mean"] is None:
        return "identical" if spread.get("n") == 0 and fmt == "psnr" else "-"
    if fmt == "thresh":  # the digits the threshold was chosen with (0.01465, not 0.01); the same on every prompt
        return format(spread["mean"], ".6g") + (f" ± {spread['std']:.2g}" if spread["n"] > 1 and spread["std"] else "")
    text = format(spread["mean"], ".2f" if fmt != "ssim" else ".4f")
    return text + (f" ± {format(spread['std'], '.2f' if fmt != 'ssim' else '.4f')}" if spread["n"] > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    n = len(report["prompts"])
    lines = [f"# MagCache sweep: {report['task']}, {n} prompt(s)", "",
             "Quality is measured against each prompt's uncached video (same seed). PSNR in dB (identical "
             "videos: no finite PSNR); SSIM is the luma SSIM (11x11 Gaussian window, sigma 1.5). "
             "Values are means over prompts ± their standard deviation.", "",
             "| setting | thresh | forward speedup | wall speedup | PSNR | SSIM (luma) | LPIPS |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["settings"]:
        lines.append(f"| {s['setting']} | {_cell(s['thresh'], 'thresh')} | {_cell(s['forward_speedup'], 'x')} | "
                     f"{_cell(s['wall_speedup'], 'x')} | {_cell(s['psnr'], 'psnr')} | {_cell(s['ssim'], 'ssim')} | "
                     f"{_cell(s['lpips'], 'ssim')} |")
    lines.append("")
    for target, best in report["best_for_target"].items():
        if best is None:
            lines.append(f"- No setting reaches {target}x: add larger thresholds or `--speedups {target}`.")
        else:
            psnr = "identical" if best["psnr"] is None else f"PSNR {best['psnr']:.2f} dB"
            lines.append(f"- To reach {target}x at the smallest quality cost: **{best['setting']}** "
                         f"(thresh {best['thresh']:.4g}, {best['forward_speedup']:.2f}x, {psnr}, "
                         f"SSIM {best['ssim']:.4f}).")
    return "\n".join(lines) + "\n"


def plot_pareto(report: dict[str, Any], path: Path) -> Path:
    """Forward-count (filled) and wall (hollow) speedup against PSNR and SSIM, one point per setting."""
    pareto_figure(report).savefig(path, dpi=100)
    return path


def pareto_figure(report: dict[str, Any]) -> Any:
    """The figure `plot_pareto` saves: every point, filled or hollow, labelled with its setting."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax_psnr, ax_ssim = fig.subplots(1, 2)
    for ax, key, label in ((ax_psnr, "psnr", "PSNR vs reference (dB)"), (ax_ssim, "ssim", "SSIM (luma) vs reference")):
        for s in report["settings"]:
            y, err = s[key]["mean"], s[key]["std"]
            if y is None:
                continue
            ax.errorbar(s["forward_speedup"]["mean"], y, yerr=err, fmt="o", color="tab:blue", capsize=3)
            ax.errorbar(s["wall_speedup"]["mean"], y, yerr=err, fmt="o", mfc="none", color="tab:orange", capsize=3)
            ax.annotate(s["setting"], (s["forward_speedup"]["mean"], y), textcoords="offset points", xytext=(4, 4),
                        fontsize="small")
            ax.annotate(f"{s['setting']} (wall)", (s["wall_speedup"]["mean"], y), textcoords="offset points",
                        xytext=(4, -10), fontsize="small", color="tab:orange")
        ax.set_xlabel("speedup over uncached (filled: forward count, hollow: wall)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MagCache sweep, {report['task']}, {len(report['prompts'])} prompt(s)")
    return fig


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    from launcher.outputs.atomic import atomic_path, write_json

    write_json(out_dir / "sweep.json", report)
    with atomic_path(out_dir / "report.md", suffix=".md") as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")
    with atomic_path(out_dir / "pareto.png", suffix=".png") as tmp:
        plot_pareto(report, tmp)


def _print_verdicts(report: dict[str, Any], out_dir: Path) -> None:
    from launcher.outputs.report import console

    for line in markdown(report).splitlines():
        if line.startswith("- "):
            console.print(line[2:].replace("**", ""), highlight=False, soft_wrap=True)
    console.print(f"report: {out_dir / 'report.md'}, {out_dir / 'pareto.png'}, {out_dir / 'sweep.json'}",
                  highlight=False, soft_wrap=True)
